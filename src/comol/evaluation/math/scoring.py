"""Scoring responses against gold answers: per-dataset accuracy, prediction alignment, run summaries."""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comol.errors import UserError
from comol.evaluation.math.answers import (
    CHOICE_DATASETS,
    DEFAULT_ABS_TOL,
    extract_choice,
    extract_number,
    is_correct,
    parse_gold,
)
from comol.files import iter_jsonl_lines

logger = logging.getLogger(__name__)


@dataclass
class DatasetScore:
    """Accuracy of one dataset.

    Attributes:
        name: dataset name.
        correct: number of correct samples.
        total: number of samples.
        records: per-sample audit records (index, prompt, output, extracted, gold, correct).
        missing: samples without a prediction (``None`` output), counted in ``total`` as wrong.
    """

    name: str
    correct: int
    total: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    missing: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "missing": self.missing,
        }


def score_dataset(
    name: str,
    examples: Sequence[Mapping[str, Any]],
    outputs: Sequence[str | None],
    prompts: Sequence[str | None] | None = None,
    abs_tol: float = DEFAULT_ABS_TOL,
) -> DatasetScore:
    """Score generated responses against the gold answers of one dataset.

    Args:
        name: dataset name; ``aqua`` (or any dataset whose gold answers are letters) is scored by letter.
        examples: records with ``answer``.
        outputs: one response per example (``None`` for a missing prediction, scored wrong).
        prompts: the prompts, stored in the audit records.
        abs_tol: numeric tolerance.

    Returns:
        The score, with per-sample records.
    """
    if len(outputs) != len(examples):
        raise ValueError(f"{name}: {len(outputs)} outputs for {len(examples)} examples.")
    if not examples:
        raise ValueError(f"{name}: no examples to score.")
    records: list[dict[str, Any]] = []
    correct = 0
    for index, (example, output) in enumerate(zip(examples, outputs, strict=True)):
        gold = parse_gold(example["answer"])
        choice = name.lower() in CHOICE_DATASETS or isinstance(gold, str)
        text = output or ""
        pred: float | str | None = extract_choice(text) if choice else extract_number(text)
        ok = is_correct(pred, gold, abs_tol)
        correct += ok
        records.append(
            {
                "index": index,
                "prompt": prompts[index] if prompts is not None else None,
                "output": output,
                "extracted": pred,
                "gold": gold,
                "correct": ok,
            }
        )
    missing = sum(output is None for output in outputs)
    return DatasetScore(name=name, correct=correct, total=len(examples), records=records, missing=missing)


def align_predictions(
    predictions: Sequence[Mapping[str, Any]],
    n_examples: int,
    n_data: int | None = None,
    source: str = "predictions",
    lines: Sequence[int] | None = None,
) -> list[str | None]:
    """Order ``{"index": i, "output": "..."}`` predictions by index; indices without one become ``None``.

    Every ``index`` must be a JSON integer in ``0 .. n_data - 1`` and appear once; every ``output`` must be
    a string. Predictions for indices in ``n_examples .. n_data - 1`` (examples left out by ``--limit``)
    are skipped, with a log line. Examples without a prediction are kept as ``None``: they are scored as
    wrong, counted as ``missing`` in the results and reported with a warning.

    Args:
        predictions: the prediction objects, in file order.
        n_examples: the examples being scored (the first ``n_examples`` of the data).
        n_data: how many examples the data file holds (default ``n_examples``).
        source: the predictions file, for messages.
        lines: the file line of each prediction, for messages (default: 1, 2, ...).

    Returns:
        ``n_examples`` outputs, ``None`` where there is no prediction.

    Raises:
        UserError: a prediction lacks ``index``/``output``, an index is not an integer, is out of range or
            repeats, or an output is not a string (the message names the file and line).
    """
    n_data = n_examples if n_data is None else n_data
    lines = list(lines) if lines is not None else list(range(1, len(predictions) + 1))
    outputs: list[str | None] = [None] * n_examples
    first_line: dict[int, int] = {}
    beyond = 0
    for line, pred in zip(lines, predictions, strict=True):
        where = f"{source}:{line}"
        if "index" not in pred or "output" not in pred:
            raise UserError(f"{where}: a prediction needs 'index' and 'output' fields, got {sorted(pred)}.")
        index = pred["index"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise UserError(f"{where}: 'index' must be an integer (0-based example number), got {index!r}.")
        if not 0 <= index < n_data:
            raise UserError(
                f"{where}: 'index' {index} is out of range; the data has {n_data} examples (0..{n_data - 1})."
            )
        if index in first_line:
            raise UserError(f"{where}: index {index} already has a prediction on line {first_line[index]}.")
        first_line[index] = line
        if not isinstance(pred["output"], str):
            raise UserError(f"{where}: 'output' must be a string, got {type(pred['output']).__name__}.")
        if index < n_examples:
            outputs[index] = pred["output"]
        else:
            beyond += 1
    if beyond:
        logger.info(
            "%s: %d predictions for examples beyond the first %d are not scored.", source, beyond, n_examples
        )
    missing = [i for i, output in enumerate(outputs) if output is None]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        logger.warning(
            "%s: %d of %d examples have no prediction (indices %s); they are scored as wrong.",
            source,
            len(missing),
            n_examples,
            shown,
        )
    return outputs


def load_predictions(
    path: str | os.PathLike[str], n_examples: int, n_data: int | None = None
) -> list[str | None]:
    """Read a predictions JSONL file and align it to the examples (see :func:`align_predictions`)."""
    numbered = list(iter_jsonl_lines(path))
    return align_predictions(
        [r for _, r in numbered], n_examples, n_data, source=str(path), lines=[n for n, _ in numbered]
    )


def results_summary(scores: Sequence[DatasetScore]) -> dict[str, Any]:
    """One run's results: per-dataset accuracy and the macro average over datasets.

    Returns:
        ``{"datasets": {name: {"accuracy", "correct", "total", "missing"}}, "average": float,
        "accuracy": float, "correct": int, "total": int, "missing": int}``; ``accuracy`` is the macro
        average (the papers' "Avg." column), ``correct``/``total``/``missing`` are sums.
    """
    per = {s.name: s.summary() for s in scores}
    average = statistics.fmean(s.accuracy for s in scores) if scores else 0.0
    return {
        "datasets": per,
        "average": average,
        "accuracy": average,
        "correct": sum(s.correct for s in scores),
        "total": sum(s.total for s in scores),
        "missing": sum(s.missing for s in scores),
    }
