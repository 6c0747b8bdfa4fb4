"""Scoring responses against gold answers: per-dataset accuracy, prediction alignment, run summaries."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from comol.evaluation.math.answers import (
    CHOICE_DATASETS,
    DEFAULT_ABS_TOL,
    extract_choice,
    extract_number,
    is_correct,
    parse_gold,
)

logger = logging.getLogger(__name__)


@dataclass
class DatasetScore:
    """Accuracy of one dataset.

    Attributes:
        name: dataset name.
        correct: number of correct samples.
        total: number of samples.
        records: per-sample audit records (index, prompt, output, extracted, gold, correct).
    """

    name: str
    correct: int
    total: int
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


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
    return DatasetScore(name=name, correct=correct, total=len(examples), records=records)


def align_predictions(predictions: Sequence[Mapping[str, Any]], n_examples: int) -> list[str | None]:
    """Order ``{"index": i, "output": ...}`` predictions by index; missing indices become ``None``.

    Indices at or beyond ``n_examples`` are ignored (e.g. with ``--limit``).

    Raises:
        ValueError: a prediction lacks ``index``/``output``, or an index repeats.
    """
    outputs: list[str | None] = [None] * n_examples
    seen: set[int] = set()
    for number, pred in enumerate(predictions):
        if "index" not in pred or "output" not in pred:
            raise ValueError(f"Prediction {number} needs 'index' and 'output' fields, got {sorted(pred)}.")
        index = int(pred["index"])
        if index in seen:
            raise ValueError(f"Prediction index {index} appears twice.")
        seen.add(index)
        if index < 0:
            raise ValueError(f"Prediction index {index} is negative.")
        if index < n_examples:
            outputs[index] = str(pred["output"])
    missing = outputs.count(None)
    if missing:
        logger.warning("%d of %d examples have no prediction; they are scored as wrong.", missing, n_examples)
    return outputs


def results_summary(scores: Sequence[DatasetScore]) -> dict[str, Any]:
    """One run's results: per-dataset accuracy and the macro average over datasets.

    Returns:
        ``{"datasets": {name: {"accuracy", "correct", "total"}}, "average": float, "accuracy": float,
        "correct": int, "total": int}``; ``accuracy`` is the macro average (the papers' "Avg." column),
        ``correct``/``total`` are sums.
    """
    per = {s.name: s.summary() for s in scores}
    average = statistics.fmean(s.accuracy for s in scores) if scores else 0.0
    return {
        "datasets": per,
        "average": average,
        "accuracy": average,
        "correct": sum(s.correct for s in scores),
        "total": sum(s.total for s in scores),
    }
