"""Answer extraction and comparison for arithmetic reasoning.

Extraction follows what models actually write: the number after "The answer is" (or "answer:"), else
the last number of the response; thousands separators, currency and percent signs, negative numbers,
decimals and fractions are understood. A prediction is correct when it is numerically within a small
tolerance of the gold answer (the LLM-Adapters evaluation uses an absolute tolerance of 0.001). The gold
answer is a number, except for AQuA where it is an option letter ``A``-``E``.
"""

from __future__ import annotations

import math
import re
from typing import Any

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
