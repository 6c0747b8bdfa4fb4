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

from comol.errors import UserError
from comol.files import iter_jsonl_lines

logger = logging.getLogger(__name__)


LOCAL_SUFFIXES: tuple[str, ...] = (".json", ".jsonl")


def parse_data_spec(spec: str) -> tuple[str, str]:
    """Split ``name=path`` (or a bare path, named by its file stem) into ``(name, source)``."""
    if "=" in spec:
        name, source = spec.split("=", 1)
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise UserError(f"Bad --data value {spec!r}; expected NAME=PATH.")
        return name, source
    return Path(spec).stem.split(".")[0].lower(), spec


def _normalise_record(record: Any, where: str) -> dict[str, Any]:
    """LLM-Adapters fields from a record; hub GSM8K records (``question``/``answer``) are mapped.

    Args:
        record: one record.
        where: ``FILE record N`` for error messages.
    """
    if not isinstance(record, Mapping):
        raise UserError(
            f"{where}: expected a JSON object with 'instruction' and 'answer', got {record!r:.60}."
        )
    out = dict(record)
    if "instruction" not in out:
        for key in ("question", "Question", "problem", "Body"):
            if key in out:
                out["instruction"] = out[key]
                break
        else:
            raise UserError(f"{where}: no 'instruction' (or 'question') field; it has {sorted(out)}.")
    out.setdefault("input", "")
    if "answer" not in out:
        raise UserError(f"{where}: no 'answer' field; it has {sorted(out)}.")
    return out


def _read_json_records(path: Path) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); use .jsonl for one record per line."
        ) from err
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err}).") from err
    if isinstance(loaded, dict):
        loaded = loaded.get("data", loaded.get("test"))
    if not isinstance(loaded, list):
        raise UserError(
            f"{path}: expected a JSON list of records (or an object with a 'data' or 'test' list)."
        )
    return loaded


def load_examples(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Load evaluation records from a local JSON/JSONL file or a ``datasets`` hub id.

    Args:
        source: a path to a ``.json`` file (a list of records, or an object with a ``data`` or ``test``
            list) or ``.jsonl`` file; otherwise a hub id ``ID[:CONFIG][@SPLIT]`` (split ``test`` by default).
            A missing path ending in ``.json``/``.jsonl`` (or starting with ``/``, ``.`` or ``~``) is an
            error, never looked up on the hub.
        limit: keep only the first ``limit`` records (a positive integer).

    Returns:
        Records with at least ``instruction``, ``input`` and ``answer``.

    Raises:
        UserError: the file is missing or malformed, a record lacks a field, the dataset is empty, or
            ``limit`` is not positive.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, got {limit!r}.")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            numbered = list(iter_jsonl_lines(path))
            records: list[Any] = [r for _, r in numbered]
            places = [f"{path}:{n}" for n, _ in numbered]
        else:
            records = _read_json_records(path)
            places = [f"{path} record {i}" for i in range(len(records))]
    elif path.exists() or path.suffix in LOCAL_SUFFIXES or source.startswith(("/", ".", "~")):
        raise UserError(f"{source}: no such file; give the path of a JSON or JSONL dataset file.")
    else:
        import datasets  # heavy; only for hub ids

        hub_id, _, split = source.partition("@")
        hub_id, _, config = hub_id.partition(":")
        logger.info("Loading %s (config=%s, split=%s) with datasets", hub_id, config or None, split or "test")
        try:
            records = list(datasets.load_dataset(hub_id, config or None, split=split or "test"))
        except Exception as err:  # the hub's errors vary (offline, unknown id, bad config/split)
            raise UserError(
                f"{source}: not a local file, and loading it as a hub dataset ID[:CONFIG][@SPLIT] failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            ) from err
        places = [f"{source} record {i}" for i in range(len(records))]
    if not records:
        raise UserError(f"{source}: the dataset holds no records.")
    if limit is not None:
        records = records[:limit]
    return [_normalise_record(r, where) for r, where in zip(records, places, strict=False)]
