"""Arithmetic-reasoning evaluation (``comol eval math``), one module per stage.

* :mod:`~comol.evaluation.math.answers`: answer extraction (numbers, option letters) and comparison.
* :mod:`~comol.evaluation.math.data`: LLM-Adapters JSON/JSONL datasets and hub datasets.
* :mod:`~comol.evaluation.math.scoring`: per-dataset accuracy, predictions aligned to examples, summaries.
* :mod:`~comol.evaluation.math.tables`: mean ± std over runs and Markdown result tables.

The names below are re-exported so that ``from comol.evaluation.math import extract_number`` works.
"""

from comol.evaluation.math.answers import (
    CHOICE_DATASETS,
    CHOICES,
    DEFAULT_ABS_TOL,
    MATH_DATASETS,
    extract_choice,
    extract_number,
    is_correct,
    parse_gold,
    strip_continuation,
)
from comol.evaluation.math.data import load_examples, parse_data_spec
from comol.evaluation.math.scoring import DatasetScore, align_predictions, results_summary, score_dataset
from comol.evaluation.math.tables import aggregate_runs, load_results, markdown_table

__all__ = [
    "CHOICES",
    "CHOICE_DATASETS",
    "DEFAULT_ABS_TOL",
    "MATH_DATASETS",
    "DatasetScore",
    "aggregate_runs",
    "align_predictions",
    "extract_choice",
    "extract_number",
    "is_correct",
    "load_examples",
    "load_results",
    "markdown_table",
    "parse_data_spec",
    "parse_gold",
    "results_summary",
    "score_dataset",
    "strip_continuation",
]
