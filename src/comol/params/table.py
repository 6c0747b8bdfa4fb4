"""Rendering: the paper's rows counted (:func:`paper_table`) and written as the Markdown table of ``README.md``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from comol.params.counting import build_meta_model, count_on, count_params_by_depth, load_model_config
from comol.params.paper import PAPER_ROWS, TOLERANCE_M, PaperRow

MARKERS = ("<!-- paper-table:start -->", "<!-- paper-table:end -->")
"""The lines between which :func:`write_paper_table` replaces the table in a Markdown file."""


def paper_table(rows: Iterable[PaperRow] = PAPER_ROWS, by_depth: bool = False) -> list[dict[str, Any]]:
    """Count every row on its preset.

    Args:
        rows: the rows to count.
        by_depth: use :func:`count_params_by_depth` (same result, much faster) instead of full-depth models.

    Returns:
        One dict per row: ``{"row": PaperRow, "ours": int}``. Rows with identical settings are counted once.
    """
    bases: dict[str, nn.Module] = {}
    cache: dict[tuple[str, str, str], int] = {}
    out = []
    for row in rows:
        key = (row.model, row.method, json.dumps(row.options, sort_keys=True))
        if key not in cache:
            if by_depth:
                cache[key] = count_params_by_depth(row.model, row.method, **row.options)
            else:
                if row.model not in bases:
                    bases[row.model] = build_meta_model(load_model_config(row.model))
                cache[key] = count_on(bases[row.model], row.method, **row.options).trainable
        out.append({"row": row, "ours": cache[key]})
    return out


def paper_table_markdown(results: list[dict[str, Any]]) -> str:
    """The Markdown table of ``README.md`` from :func:`paper_table`'s results."""
    lines = [
        "| Table | Model | Row | Method and settings | Paper | Ours | Match | Note |",
        "|---|---|---|---|---:|---:|:---:|---|",
    ]
    for item in results:
        row: PaperRow = item["row"]
        ours = item["ours"]
        ours_s = f"{ours / 1e6:.2f}M ({ours:,})"
        match = "yes" if abs(ours / 1e6 - row.paper_m) <= TOLERANCE_M + 1e-9 else "**no**"
        lines.append(
            f"| {row.table} | {row.model} | {row.label} | `{row.method}` {row.settings()} | "
            f"{row.paper_m:.2f}M | {ours_s} | {match} | {row.note} |"
        )
    return "\n".join(lines) + "\n"


def _split_at_markers(path: Path) -> tuple[str, str]:
    """The text of ``path`` up to and including the start marker line, and from the end marker line on."""
    start, end = MARKERS
    if not path.is_file():
        raise ValueError(f"{path} does not exist; --output names a Markdown file holding {start} ... {end}.")
    text = path.read_text()
    # The markers count only as whole lines, so that a text may mention them.
    match = re.search(rf"^{re.escape(start)}\n(.*?)^{re.escape(end)}$", text, flags=re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(
            f"{path} has no {start} ... {end} lines; add them, each on a line of its own, where the table belongs."
        )
    return text[: match.start(1)], text[match.end(1) :]


def check_paper_table_file(path: Path) -> None:
    """Raise ``ValueError`` unless :func:`write_paper_table` can write into ``path`` (call before counting)."""
    _split_at_markers(path)


def write_paper_table(path: Path, table: str) -> None:
    """Replace the text between the :data:`MARKERS` lines of the Markdown file ``path`` with ``table``.

    Raises:
        ValueError: the file does not exist or lacks the markers (nothing is written then).
    """
    head, tail = _split_at_markers(path)
    path.write_text(f"{head}{table}{tail}")
