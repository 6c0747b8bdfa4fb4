"""Result tables: mean ± std over runs (seeds) and Markdown tables in the papers' layout."""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comol.errors import UserError

logger = logging.getLogger(__name__)


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of accuracies over several runs (e.g. seeds).

    Args:
        runs: results objects as returned by :func:`results_summary` (or read from ``results.json``).

    Returns:
        ``{"runs": n, "datasets": {name: {"mean", "std", "values"}}, "average": {"mean", "std", "values"}}``,
        accuracies in 0..1; ``std`` is the sample standard deviation (0 for a single run). Only datasets
        present in every run are kept.
    """
    if not runs:
        raise ValueError("No runs to aggregate.")
    names = [n for n in runs[0]["datasets"] if all(n in r["datasets"] for r in runs)]
    dropped = {n for r in runs for n in r["datasets"]} - set(names)
    if dropped:
        logger.warning("Datasets missing from some runs are left out: %s", sorted(dropped))

    def stats(values: list[float]) -> dict[str, Any]:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "values": values}

    datasets = {n: stats([float(r["datasets"][n]["accuracy"]) for r in runs]) for n in names}
    averages = [statistics.fmean(float(r["datasets"][n]["accuracy"]) for n in names) for r in runs]
    return {"runs": len(runs), "datasets": datasets, "average": stats(averages) if names else None}


def _display_name(name: str) -> str:
    known = {
        "gsm8k": "GSM8K",
        "svamp": "SVAMP",
        "multiarith": "MultiArith",
        "addsub": "AddSub",
        "aqua": "AQuA",
        "singleeq": "SingleEq",
        "mawps": "MAWPS",
    }
    return known.get(name.lower(), name)


def markdown_table(results: Mapping[str, Any], label: str = "accuracy (%)") -> str:
    """A Markdown table, one column per dataset plus ``Avg.``, accuracies in percent.

    Args:
        results: one run (:func:`results_summary`) or an aggregate (:func:`aggregate_runs`); aggregates
            print ``mean ± std``.
        label: first-column text.
    """
    datasets = results["datasets"]
    names = list(datasets)
    header = f"| {label} | " + " | ".join(_display_name(n) for n in names) + " | Avg. |"
    rule = "|---|" + "---:|" * (len(names) + 1)
    if "runs" in results:

        def cell(entry: Mapping[str, Any] | None) -> str:
            if entry is None:
                return "-"
            return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"

        row_label = f"mean ± std ({results['runs']} runs)"
        cells = [cell(datasets[n]) for n in names] + [cell(results["average"])]
    else:
        row_label = "run"
        cells = [f"{100 * datasets[n]['accuracy']:.1f}" for n in names] + [f"{100 * results['average']:.1f}"]
    lines = [header, rule, f"| {row_label} | " + " | ".join(cells) + " |"]
    for n in names:
        missing = datasets[n].get("missing", 0)
        if missing:
            lines.append(
                f"\n{_display_name(n)}: {missing} of {datasets[n]['total']} examples had no prediction (scored wrong)."
            )
    return "\n".join(lines) + "\n"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` written by ``comol eval math`` (a directory means ``DIR/results.json``).

    Raises:
        UserError: the file is missing, not JSON, or not a math results file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file; give results.json files or directories holding one.")
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}).") from err
    if not isinstance(results, dict) or "datasets" not in results:
        raise UserError(
            f"{path}: not a comol math results file (no 'datasets'); give a comol eval math results.json."
        )
    return results
