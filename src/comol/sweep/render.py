"""``results.md`` in the paper's layout (rows = methods, columns = datasets, Average, Param; mean ± std),
the router columns, ``--compare paper`` tables, and the plot (bars with error bars, or metric vs grid value).
"""

from __future__ import annotations

import contextlib
import io as _io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from comol import files
from comol.sweep.paper import PAPER_LABELS, PAPER_TABLES


def _pm(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stats:
        return "–"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _params(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return "/".join(f"{v / 1e6:.3f}M" for v in value)
    return f"{value / 1e6:.3f}M"


def markdown(data: Mapping[str, Any], compare: str | None = None) -> str:
    """The sweep's tables as markdown."""
    agg = data["aggregate"]
    columns = list(dict.fromkeys(c for g in agg.values() for c in g["metrics"]))
    lines = [
        "| Method | "
        + " | ".join(columns)
        + " | Average | Param | router entropy / log E | largest expert load | train loss | seeds |",
        "|---|" + "---:|" * (len(columns) + 6),
    ]
    for name, g in agg.items():
        cells = [_pm(g["metrics"].get(c)) for c in columns]
        seeds = f"{len(g['seeds'])}" + (f" ({len(g['failed'])} failed)" if g["failed"] else "")
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_pm(g.get('Average'))} | {_params(g['params'])} | "
            f"{_pm(g.get('router_entropy'))} | {_pm(g.get('router_max_load'))} | {_pm(g.get('train_loss'), digits=3)} | {seeds} |"
        )
    failed = [(name, f) for name, g in agg.items() for f in g["failed"]]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {name}, seed {f['seed']}: {f['error']}" for name, f in failed]
    lines += [
        "",
        "Accuracy in %; mean ± std over seeds (std 0.00 with one seed). Router entropy: mean over routers of the"
        " gate entropy divided by log E (1 = uniform gates); largest expert load: the largest share of gate mass"
        " any one expert gets in any router; both over the evaluation prompts at the end of training.",
    ]
    if compare == "paper":
        lines += ["", _paper_markdown(agg)]
    return "\n".join(lines) + "\n"


def _paper_markdown(agg: Mapping[str, Any]) -> str:
    """The paper's Tables 2-4 rows of the sweep's methods, in the sweep's row order."""
    labels = list(dict.fromkeys(g["label"] for g in agg.values()))
    ordered = [PAPER_LABELS[lab] for lab in labels if lab in PAPER_LABELS]
    out = ["## The paper's figures (for comparison; other models, data and budgets)"]
    for table in PAPER_TABLES.values():
        out += ["", f"{table.name}: {table.title}", ""]
        out.append("| Method | " + " | ".join(table.columns) + " | Param |")
        out.append("|---|" + "---:|" * (len(table.columns) + 1))
        rows = [r for r in ordered if r in table.rows] or list(table.rows)
        for row in rows:
            cells, param = table.rows[row]
            text = [f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}" for m, s in cells]
            out.append(f"| {row} | " + " | ".join(text) + f" | {param:.2f}M |")
        missing = [lab for lab in labels if lab not in PAPER_LABELS or PAPER_LABELS[lab] not in table.rows]
        if missing:
            out.append(f"\n(no row in the paper's {table.name} for: {', '.join(missing)})")
    return "\n".join(out)


def plot(data: Mapping[str, Any], path: Path) -> Path:
    """Bars (Average, mean ± std per row) or, with a grid, Average against the grid value per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = {k: g for k, g in data["aggregate"].items() if "Average" in g}
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(agg) + 2), 4))
    grid_keys = list(dict.fromkeys(k for g in agg.values() for k in g["grid"]))
    if len(grid_keys) == 1:
        key = grid_keys[0]
        for label in dict.fromkeys(g["label"] for g in agg.values()):
            rows = [g for g in agg.values() if g["label"] == label and key in g["grid"]]
            with contextlib.suppress(ValueError):
                rows.sort(key=lambda g: float(g["grid"][key]))
            ax.errorbar(
                [g["grid"][key] for g in rows],
                [g["Average"]["mean"] for g in rows],
                yerr=[g["Average"]["std"] for g in rows],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xlabel(key)
        ax.legend()
    else:
        names = list(agg)
        ax.bar(range(len(names)), [agg[n]["Average"]["mean"] for n in names],
               yerr=[agg[n]["Average"]["std"] for n in names], capsize=3)  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("Average (mean ± std over seeds)")
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def write_reports(out_dir: Path, data: Mapping[str, Any], compare: str | None = None) -> None:
    """``results.md`` and ``results.png`` (atomically)."""
    files.atomic_write_text(out_dir / "results.md", markdown(data, compare))
    if any("Average" in g for g in data["aggregate"].values()):
        plot(data, out_dir / "results.png")
