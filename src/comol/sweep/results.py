"""The sweep's ``results.json``: one record per run, then per table row (method[@grid]) the mean and
standard deviation over seeds of every metric. Written atomically after every run, so an interrupted sweep
keeps what it finished and a re-run skips it."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from comol import files
from comol.errors import UserError

RESULTS_JSON = "results.json"


def load_runs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The run records of an earlier invocation, by run id (empty if there is none)."""
    path = out_dir / RESULTS_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {r["run_id"]: r for r in data["runs"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(
            f"{path} is not a comol sweep results file ({err}); move it or pick another --out."
        ) from err


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(runs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: ``{"label", "grid", "seeds", "failed", "metrics": {col: stats}, "Average": stats, "params",
    "train_loss": stats, "router_entropy": stats, "router_max_load": stats, "wall_s": stats}``.

    ``Average`` is each run's mean over its datasets (the paper's macro average), then mean ± std over seeds.
    Only finished runs count; ``failed`` lists the others' errors.
    """
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        g = groups.setdefault(
            run["group"], {"label": run["label"], "grid": run["grid"], "ok": [], "failed": []}
        )
        (g["ok"] if run["status"] == "ok" else g["failed"]).append(run)
    out = {}
    for name, g in groups.items():
        ok = g["ok"]
        entry: dict[str, Any] = {
            "label": g["label"],
            "grid": g["grid"],
            "seeds": [r["seed"] for r in ok],
            "failed": [{"seed": r["seed"], "error": r["error"]} for r in g["failed"]],
            "metrics": {},
        }
        columns = list(dict.fromkeys(c for r in ok for c in r["metrics"]))
        for column in columns:
            entry["metrics"][column] = _stats([r["metrics"][column] for r in ok if column in r["metrics"]])
        if ok and columns:
            entry["Average"] = _stats([statistics.fmean(r["metrics"].values()) for r in ok])
        params = {r["params"] for r in ok if r["params"] is not None}
        entry["params"] = params.pop() if len(params) == 1 else (sorted(params) or None)
        for key, get in (
            ("train_loss", lambda r: r["train_loss"]),
            ("router_entropy", lambda r: (r["router"] or {}).get("entropy")),
            ("router_max_load", lambda r: (r["router"] or {}).get("max_load")),
            ("wall_s", lambda r: r["wall_s"]),
        ):
            values = [v for v in map(get, ok) if v is not None and math.isfinite(v)]
            if values:
                entry[key] = _stats(values)
        out[name] = entry
    return out


def write_results(
    out_dir: Path, runs: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Write ``results.json`` (runs in order, then the aggregate) atomically; return its content."""
    ordered = list(runs.values())
    data = {"settings": dict(settings), "runs": ordered, "aggregate": aggregate(ordered)}
    files.atomic_write_json(out_dir / RESULTS_JSON, data)
    return data
