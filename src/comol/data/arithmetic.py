"""Seeded generator of arithmetic word problems with short chain-of-thought answers.

Each problem is an LLM-Adapters record: ``instruction`` (the question), ``input`` (empty), ``output`` (one or
two reasoning sentences ending in ``"The answer is N."``) and ``answer`` (``N`` as a string). The same seed
always gives the same problems, so a held-out test set is just another seed; :func:`train_test_split`
additionally guarantees that no test question appears in the training set.

Example:
    >>> generate(1, seed=0)[0]["output"].endswith(".")
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES: tuple[str, ...] = (
    "Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Omar", "Nina", "Raj", "Ivy",
)  # fmt: skip
ITEMS: tuple[str, ...] = (
    "apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "cards", "shells", "balloons",
)  # fmt: skip

Record = dict[str, str]


def _add(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return _record(question, f"{name} has {a} + {b} = {a + b} {item}.", a + b)


def _subtract(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    return _record(question, f"{name} has {a} - {b} = {a - b} {item} left.", a - b)


def _multiply(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, each = rng.randint(2, 9), rng.randint(2, 12)
    question = f"{name} has {boxes} boxes with {each} {item} in each box. How many {item} are there in total?"
    return _record(question, f"There are {boxes} * {each} = {boxes * each} {item}.", boxes * each)


def _divide(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    question = (
        f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    )
    return _record(question, f"Each friend gets {total} / {friends} = {each} {item}.", each)


def _two_step(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} are left?"
    )
    steps = f"After buying, {name} has {a} + {b} = {a + b} {item}. After giving, {a + b} - {c} = {a + b - c}."
    return _record(question, steps, a + b - c)


KINDS: dict[str, Callable[[random.Random], Record]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "divide": _divide,
    "two_step": _two_step,
}


def _record(question: str, reasoning: str, answer: int) -> Record:
    return {
        "instruction": question,
        "input": "",
        "output": f"{reasoning} The answer is {answer}.",
        "answer": str(answer),
    }


def generate(n: int, seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS)) -> list[Record]:
    """``n`` problems drawn uniformly from ``kinds`` with a private RNG seeded by ``seed``.

    Args:
        n: number of problems.
        seed: RNG seed; equal seeds give equal lists.
        kinds: problem kinds, a subset of :data:`KINDS`.

    Returns:
        LLM-Adapters records with ``instruction``, ``input``, ``output`` and ``answer``.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"Unknown problem kinds {unknown}; choose from {sorted(KINDS)}.")
    rng = random.Random(seed)
    return [KINDS[rng.choice(kinds)](rng) for _ in range(n)]


def train_test_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Disjoint training and test sets: test questions never occur in the training set."""
    test = generate(n_test, seed=seed + 1)
    seen = {record["instruction"] for record in test}
    train: list[Record] = []
    rng_seed = seed
    while len(train) < n_train:
        batch = generate(n_train, seed=rng_seed)
        train.extend(r for r in batch if r["instruction"] not in seen)
        rng_seed += 1_000_003
    return train[:n_train], test
