"""Arithmetic-reasoning evaluation: data loading, answer extraction, scoring and result tables.

The datasets (GSM8K, SVAMP, MultiArith, AddSub, AQuA, SingleEq, MAWPS) are read in the LLM-Adapters JSON
format: a list of records with ``instruction``, ``input``, ``output`` and ``answer``. The gold answer is a
number, except for AQuA where it is an option letter ``A``-``E``.

Extraction follows what models actually write: the number after "The answer is" (or "answer:"), else
the last number of the response; thousands separators, currency and percent signs, negative numbers,
decimals and fractions are understood. A prediction is correct when it is numerically within a small
tolerance of the gold answer (the LLM-Adapters evaluation uses an absolute tolerance of 0.001).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comol.evaluation.io import read_jsonl

logger = logging.getLogger(__name__)

MATH_DATASETS: tuple[str, ...] = ("gsm8k", "svamp", "multiarith", "addsub", "aqua", "singleeq", "mawps")
"""Dataset names of the paper's arithmetic benchmarks (any other name is scored numerically)."""

CHOICE_DATASETS: frozenset[str] = frozenset({"aqua"})
"""Datasets whose gold answer is an option letter rather than a number."""

CHOICES: str = "ABCDE"

DEFAULT_ABS_TOL: float = 1e-3
"""Absolute tolerance of the numeric comparison (the LLM-Adapters evaluation's 0.001)."""

# A number as written in model output: optional sign, optional currency, digits with or without
# thousands separators, optional decimals, optional "/denominator", optional percent sign.
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w)\]])[-−])?"
    r"(?P<currency>[$€£¥])?\s?"
    r"(?P<sign2>[-−])?"
    r"(?P<int>(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d])|\d+)?"
    r"(?P<frac>\.\d+)?"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
    r"\s?(?P<pct>%)?"
)
# "The answer is", "the final answer is", "Answer:", "answer would be".
_ANSWER_CUE_RE = re.compile(r"answer\s*(?:is|:|=|would be|will be)", re.IGNORECASE)
# Prompt-template headers that mark the model continuing past its response.
_CONTINUATION_RE = re.compile(r"\n\s*###\s*(?:Instruction|Input|Response)\b")
_CHOICE_PAREN_RE = re.compile(r"\(\s*([A-E])\s*\)|(?<![A-Za-z])([A-E])\)")
_CHOICE_BARE_RE = re.compile(r"(?<![A-Za-z'])([A-E])(?![A-Za-z'])")


def strip_continuation(text: str) -> str:
    """Cut a response where the model starts a new ``### Instruction`` / ``### Input`` block."""
    match = _CONTINUATION_RE.search(text)
    return text[: match.start()] if match else text


def _numbers(text: str) -> list[float]:
    """Every number in ``text``, in order, as floats (fractions divided out, percent signs ignored)."""
    values: list[float] = []
    for match in _NUMBER_RE.finditer(text):
        integer, frac = match.group("int"), match.group("frac")
        if integer is None and frac is None:
            continue
        value = float((integer or "0").replace(",", "") + (frac or ""))
        den = match.group("den")
        if den is not None and float(den) != 0:
            value /= float(den)
        if match.group("sign") or match.group("sign2"):
            value = -value
        values.append(value)
    return values


def extract_number(text: str) -> float | None:
    """The numeric answer in a model response.

    The first number after the last "answer is"/"answer:" cue; without a cue (or no number after it),
    the last number of the response. Text after a new ``### Instruction`` header is ignored.

    Args:
        text: the generated response (without the prompt).

    Returns:
        The answer as a float, or ``None`` when the response holds no number.

    Examples:
        >>> extract_number("She pays 3 * $1,250 = $3,750. The answer is $3,750.")
        3750.0
        >>> extract_number("So 3/4 of the cake is left.")
        0.75
    """
    text = strip_continuation(text)
    cues = list(_ANSWER_CUE_RE.finditer(text))
    if cues:
        after = _numbers(text[cues[-1].end() :])
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def extract_choice(text: str) -> str | None:
    """The option letter (``A``-``E``) chosen in a multiple-choice (AQuA) response.

    In order: a letter right after an "answer is"/"answer:" cue (also as ``(D)`` or ``D)``); else the last
    ``(D)`` or ``D)``; else a lone letter ending the response.

    Args:
        text: the generated response.

    Returns:
        The upper-case letter, or ``None``.
    """
    text = strip_continuation(text)
    cues = list(_ANSWER_CUE_RE.finditer(text))
    if cues:
        tail = text[cues[-1].end() :].lstrip(" \t*:\"'")
        match = re.match(r"(?:option\s+|choice\s+)?\(?\s*([A-E])(?![A-Za-z])", tail, re.IGNORECASE)
        if match and (
            match.group(1).isupper() or tail[:1] == "(" or tail[match.end() : match.end() + 1] == ")"
        ):
            return match.group(1).upper()
    parens = _CHOICE_PAREN_RE.findall(text)
    if parens:
        letter_a, letter_b = parens[-1]
        return letter_a or letter_b
    match = re.search(r"(?<![A-Za-z'])([A-E])[\s.!)*]*$", text.strip())
    return match.group(1) if match else None


def parse_gold(answer: Any) -> float | str | None:
    """The gold answer of a record as a float (or an option letter for multiple choice).

    Accepts numbers, numeric strings ("1,234", "$5", "3/4") and GSM8K hub solutions ending with
    ``#### 18``.
    """
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int | float):
        return float(answer)
    text = str(answer).strip()
    if text.upper() in CHOICES and len(text) == 1:
        return text.upper()
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _numbers(text)
    return found[-1] if found else None


def is_correct(pred: float | str | None, gold: float | str | None, abs_tol: float = DEFAULT_ABS_TOL) -> bool:
    """Whether a prediction matches the gold answer (letters exactly, numbers within ``abs_tol``)."""
    if pred is None or gold is None:
        return False
    if isinstance(gold, str) or isinstance(pred, str):
        return str(pred).upper() == str(gold).upper()
    return math.isfinite(pred) and abs(pred - gold) <= abs_tol


# --------------------------------------------------------------------------------------------- data


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


# ------------------------------------------------------------------------------------------ scoring


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


# --------------------------------------------------------------------------------------------- tables


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
    return "\n".join([header, rule, f"| {row_label} | " + " | ".join(cells) + " |"]) + "\n"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` written by ``comol eval math`` (a directory means ``DIR/results.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    if "datasets" not in results:
        raise ValueError(f"{path}: not a comol math results file (no 'datasets').")
    return results
