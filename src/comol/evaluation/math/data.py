"""Loading arithmetic evaluation datasets (LLM-Adapters JSON/JSONL files or ``datasets`` hub ids).

The datasets (GSM8K, SVAMP, MultiArith, AddSub, AQuA, SingleEq, MAWPS) are read in the LLM-Adapters JSON
format: a list of records with ``instruction``, ``input``, ``output`` and ``answer``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from comol.evaluation.io import read_jsonl

logger = logging.getLogger(__name__)


def parse_data_spec(spec: str) -> tuple[str, str]:
    """Split ``name=path`` (or a bare path, named by its file stem) into ``(name, source)``."""
    if "=" in spec:
        name, source = spec.split("=", 1)
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise ValueError(f"Bad --data value {spec!r}; expected NAME=PATH.")
        return name, source
    return Path(spec).stem.split(".")[0].lower(), spec


def _normalise_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """LLM-Adapters fields from a record; hub GSM8K records (``question``/``answer``) are mapped."""
    out = dict(record)
    if "instruction" not in out:
        for key in ("question", "Question", "problem", "Body"):
            if key in out:
                out["instruction"] = out[key]
                break
        else:
            raise ValueError(f"Record has no 'instruction' (or 'question') field: {sorted(out)}.")
    out.setdefault("input", "")
    if "answer" not in out:
        raise ValueError(f"Record has no 'answer' field: {sorted(out)}.")
    return out


def load_examples(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Load evaluation records from a local JSON/JSONL file or a ``datasets`` hub id.

    Args:
        source: a path to a ``.json`` file (a list of records, or an object with a ``data`` or ``test``
            list) or ``.jsonl`` file; otherwise a hub id ``ID[:CONFIG][@SPLIT]`` (split ``test`` by default).
        limit: keep only the first ``limit`` records.

    Returns:
        Records with at least ``instruction``, ``input`` and ``answer``.
    """
    path = Path(source).expanduser()
    if path.exists():
        if path.suffix == ".jsonl":
            records: list[Any] = read_jsonl(path)
        else:
            with open(path, encoding="utf-8") as handle:
                loaded = json.load(handle)
            if isinstance(loaded, dict):
                loaded = loaded.get("data", loaded.get("test"))
            if not isinstance(loaded, list):
                raise ValueError(f"{path}: expected a JSON list of records.")
            records = loaded
    else:
        import datasets  # heavy; only for hub ids

        hub_id, _, split = source.partition("@")
        hub_id, _, config = hub_id.partition(":")
        logger.info("Loading %s (config=%s, split=%s) with datasets", hub_id, config or None, split or "test")
        records = list(datasets.load_dataset(hub_id, config or None, split=split or "test"))
    if limit is not None:
        records = records[:limit]
    return [_normalise_record(r) for r in records]
