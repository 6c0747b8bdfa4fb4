"""Answer extraction, scoring, tables and the ``comol eval math --predictions`` path."""

from __future__ import annotations

import json
import math

import pytest

from comol.cli import main
from comol.evaluation.math import (
    DatasetScore,
    aggregate_runs,
    align_predictions,
    extract_choice,
    extract_number,
    is_correct,
    load_examples,
    markdown_table,
    parse_gold,
    results_summary,
    score_dataset,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 / 2 = 24 clips in May. 48 + 24 = 72. The answer is 72.", 72),
        ("The answer is 12. Then 5 more apples fell.", 12),
        ("First 3 boxes, then 4 boxes, so 7 boxes in total", 7),
        ("He earns 1,234 + 1,000 = 2,234 dollars. The answer is 2,234.", 2234),
        ("Total cost: 3 * $1.50 = $4.50. The answer is $4.50", 4.5),
        ("She saves 50% of it. The answer is 50%.", 50),
        ("The temperature drops to -12 degrees.", -12),
        ("Its value is −3 now.", -3),
        ("The answer is 0.25", 0.25),
        ("So 3/4 of the pizza remains.", 0.75),
        ("The final answer is: 18", 18),
        ("Answer: 1,000,000", 1_000_000),
        ("10 - 4 = 6 apples left", 6),
        ("The answer is 9.\n\n### Instruction:\nHow many is 100?", 9),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: float | None) -> None:
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The speed is 45 km/h. The answer is (D).", "D"),
        ("So the answer is D", "D"),
        ("Checking each option, D) 45 km/h matches.", "D"),
        ("A train travels 120 km. The answer is B.", "B"),
        ("Among (A) 1 (B) 2 (C) 3, the right one is (C)", "C"),
        ("Answer: c) 12", "C"),
        ("The correct option is E", "E"),
        ("A man walks home.", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_parse_gold() -> None:
    assert parse_gold("1,234") == 1234
    assert parse_gold(18) == 18.0
    assert parse_gold("Janet has 16 - 3 - 4 = 9 eggs.\n#### 18") == 18
    assert parse_gold("d") == "D"
    assert parse_gold(None) is None


def test_tolerance() -> None:
    assert is_correct(18.0004, 18.0)
    assert not is_correct(18.01, 18.0)
    assert is_correct(18.01, 18.0, abs_tol=0.1)
    assert not is_correct(None, 3.0)
    assert not is_correct(float("nan"), 3.0)
    assert is_correct("d", "D")


def test_score_dataset_numeric_and_choice() -> None:
    examples = [{"instruction": "q", "answer": "4"}, {"instruction": "q", "answer": "2.5"}]
    score = score_dataset("gsm8k", examples, ["The answer is 4", "It is 2.4999"], prompts=["p0", "p1"])
    assert (score.correct, score.total) == (2, 2)
    assert score.records[0] == {
        "index": 0,
        "prompt": "p0",
        "output": "The answer is 4",
        "extracted": 4.0,
        "gold": 4.0,
        "correct": True,
    }
    aqua = score_dataset("aqua", [{"instruction": "q", "answer": "C"}], ["The answer is (C) 12"])
    assert aqua.correct == 1
    missing = score_dataset("svamp", examples, [None, "2.5"])
    assert missing.correct == 1


def test_align_predictions() -> None:
    outputs = align_predictions(
        [{"index": 2, "output": "c"}, {"index": 0, "output": "a"}, {"index": 4, "output": "x"}], 3, n_data=5
    )
    assert outputs == ["a", None, "c"]  # index 4 is in the data but beyond the first 3 (--limit 3)
    with pytest.raises(ValueError, match="line 1"):
        align_predictions([{"index": 0, "output": "a"}, {"index": 0, "output": "b"}], 1)
    with pytest.raises(ValueError, match="out of range"):
        align_predictions([{"index": 5, "output": "x"}], 3, n_data=5)


def test_aggregate_mean_std_against_naive() -> None:
    runs = [
        results_summary([DatasetScore("gsm8k", 6, 10), DatasetScore("aqua", 2, 10)]),
        results_summary([DatasetScore("gsm8k", 8, 10), DatasetScore("aqua", 4, 10)]),
        results_summary([DatasetScore("gsm8k", 7, 10), DatasetScore("aqua", 3, 10)]),
    ]
    agg = aggregate_runs(runs)
    values = [0.6, 0.8, 0.7]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # sample std
    assert math.isclose(agg["datasets"]["gsm8k"]["mean"], mean)
    assert math.isclose(agg["datasets"]["gsm8k"]["std"], std)
    assert math.isclose(agg["average"]["mean"], (0.4 + 0.6 + 0.5) / 3)
    table = markdown_table(agg)
    assert "| GSM8K | AQuA | Avg. |" in table
    assert "70.0 ± 10.0" in table and "30.0 ± 10.0" in table
    single = markdown_table(runs[0])
    assert "| run | 60.0 | 20.0 | 40.0 |" in single


def test_load_examples_json_jsonl_and_hub(tmp_path, monkeypatch) -> None:
    records = [{"instruction": f"q{i}", "input": "", "output": "", "answer": str(i)} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_examples(str(tmp_path / "d.json")) == records
    assert len(load_examples(str(tmp_path / "d.jsonl"), limit=2)) == 2

    import datasets

    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"question": "Q?", "answer": "steps\n#### 7"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_examples("openai/gsm8k:main")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert loaded[0]["instruction"] == "Q?" and parse_gold(loaded[0]["answer"]) == 7


def _write_data(tmp_path):
    data = [
        {
            "instruction": "Tom has 1,000 apples and buys 234. How many?",
            "input": "",
            "output": "",
            "answer": "1234",
        },
        {"instruction": "A shirt costs $5.50; two?", "input": "", "output": "", "answer": "11"},
        {"instruction": "Temperature 3 minus 5?", "input": "", "output": "", "answer": "-2"},
        {"instruction": "Half of 3?", "input": "", "output": "", "answer": "1.5"},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(data))
    preds = [
        {"index": 0, "output": "1,000 + 234 = 1,234. The answer is 1,234."},
        {"index": 1, "output": "2 * $5.50 = $11.00. The answer is $11."},
        {"index": 3, "output": "3/2 = 1.5, so 3/2"},
        {"index": 2, "output": "3 - 5 = -1"},
    ]
    pred_path = tmp_path / "preds.jsonl"
    pred_path.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return path, pred_path


def test_cli_predictions_json(tmp_path, capsys) -> None:
    data, preds = _write_data(tmp_path)
    out_dir = tmp_path / "out"
    rc = main(
        [
            "eval",
            "math",
            "--data",
            f"gsm8k={data}",
            "--predictions",
            str(preds),
            "--json",
            "--output-dir",
            str(out_dir),
            "--no-progress",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["correct"], result["total"]) == (3, 4)
    assert result["accuracy"] == pytest.approx(0.75)
    audit = [json.loads(line) for line in (out_dir / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in audit] == [True, True, False, True]
    assert set(audit[0]) == {"index", "prompt", "output", "extracted", "gold", "correct"}
    assert "GSM8K" in (out_dir / "results.md").read_text()
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]

    rc = main(["eval", "math", "--aggregate", str(out_dir), str(out_dir / "results.json"), "--json"])
    agg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and agg["runs"] == 2 and agg["datasets"]["gsm8k"]["std"] == 0


def test_cli_predictions_subprocess(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import comol.cli

    data, preds = _write_data(tmp_path)
    src = str(Path(comol.cli.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "comol",
            "eval",
            "math",
            "--data",
            f"gsm8k={data}",
            "--predictions",
            str(preds),
            "--json",
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["accuracy"], result["correct"], result["total"]) == (1.0, 2, 2)


def test_cli_errors(tmp_path) -> None:
    data, _ = _write_data(tmp_path)
    assert main(["eval", "math", "--data", f"gsm8k={data}"]) == 2
    assert main(["eval", "math"]) == 2


def _math_cli(tmp_path, pred_lines: list[str], *extra: str) -> list[str]:
    data, _ = _write_data(tmp_path)
    preds = tmp_path / "bad.jsonl"
    preds.write_text("".join(line + "\n" for line in pred_lines))
    return ["eval", "math", "--data", f"gsm8k={data}", "--predictions", str(preds), "--json", *extra]


def _error_line(capsys) -> str:
    """The one ``comol: error:`` line main wrote to stderr (and that there is exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("comol: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"index": 0.9, "output": "4"}', "must be an integer"),
        ('{"index": true, "output": "4"}', "must be an integer"),
        ('{"index": "1", "output": "4"}', "must be an integer"),
        ('{"index": 4, "output": "4"}', "out of range"),  # the data has 4 examples (0..3)
        ('{"index": 49, "output": "4"}', "out of range"),
        ('{"index": -1, "output": "4"}', "out of range"),
        ('{"index": 0, "output": "again"}', "already has a prediction on line 1"),
        ('{"index": 1, "output": 11}', "'output' must be a string"),
        ('{"index": 1}', "needs 'index' and 'output'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_prediction_lines_are_rejected_with_file_and_line(tmp_path, capsys, bad_line, message) -> None:
    """A bad prediction line (not only a repeated index) is exit 2 naming FILE:LINE, never scored."""
    args = _math_cli(tmp_path, ['{"index": 0, "output": "1234"}', bad_line])
    assert main(args) == 2
    line = _error_line(capsys)
    assert f"{tmp_path / 'bad.jsonl'}:2:" in line and message in line
    assert not capsys.readouterr().out  # nothing reported as a result


@pytest.mark.parametrize("limit", ["-2", "0", "1.5"])
def test_limit_must_be_positive(tmp_path, capsys, limit) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_math_cli(tmp_path, ['{"index": 0, "output": "1234"}'], "--limit", limit))
    assert exit_info.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_limit_rejected_by_library(tmp_path) -> None:
    from comol.evaluation.runner import evaluate_math

    data, preds = _write_data(tmp_path)
    with pytest.raises(ValueError, match="limit"):
        evaluate_math([f"gsm8k={data}"], [str(preds)], limit=0)
    with pytest.raises(ValueError, match="limit"):
        load_examples(str(data), limit=-2)


def test_missing_predictions_are_scored_wrong_and_reported(tmp_path, capsys, caplog) -> None:
    """2 of 4 examples without a prediction: total stays 4, ``missing`` is 2, a warning and a table note."""
    args = _math_cli(tmp_path, ['{"index": 0, "output": "1234"}', '{"index": 3, "output": "1.5"}'])
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["correct"], result["total"], result["missing"]) == (2, 4, 2)
    assert result["datasets"]["gsm8k"]["missing"] == 2
    assert any("2 of 4 examples have no prediction (indices 1, 2)" in r.getMessage() for r in caplog.records)
    table = markdown_table(result)
    assert "GSM8K: 2 of 4 examples had no prediction (scored wrong)." in table


def test_predictions_beyond_limit_are_not_scored(tmp_path, capsys) -> None:
    args = _math_cli(tmp_path, ['{"index": 0, "output": "1234"}', '{"index": 3, "output": "1.5"}'])
    assert main([*args, "--limit", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["correct"], result["total"], result["missing"]) == (1, 1, 0)


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys) -> None:
    data, preds = _write_data(tmp_path)
    (tmp_path / "broken.json").write_text('[{"instruction": "q", "answer": "1"},')
    (tmp_path / "noanswer.json").write_text('[{"instruction": "q", "answer": "1"}, {"instruction": "q"}]')
    (tmp_path / "empty.json").write_text("[]")
    cases = [
        (
            ["--data", f"gsm8k={tmp_path / 'nope.json'}", "--predictions", str(preds)],
            "nope.json: no such file",
        ),
        (["--data", f"gsm8k={tmp_path / 'broken.json'}", "--predictions", str(preds)], "broken.json:1:"),
        (
            ["--data", f"gsm8k={tmp_path / 'noanswer.json'}", "--predictions", str(preds)],
            "record 1: no 'answer'",
        ),
        (["--data", f"gsm8k={tmp_path / 'empty.json'}", "--predictions", str(preds)], "no records"),
        (
            ["--data", f"gsm8k={data}", "--predictions", str(tmp_path / "nope.jsonl")],
            "nope.jsonl: no such file",
        ),
        (
            ["--data", f"gsm8k={data}", "--predictions", f"svamp={preds}"],
            "no --data dataset is named 'svamp'",
        ),
        (["--aggregate", str(tmp_path / "no-run")], "no-run: no such file"),
        (["--aggregate", str(data)], "not a comol math results file"),
    ]
    for extra, message in cases:
        assert main(["eval", "math", *extra]) == 2, extra
        line = _error_line(capsys)
        assert message in line, (extra, line)


@pytest.mark.slow
def test_cli_error_subprocess_no_traceback_unless_verbose(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import comol.cli

    src = str(Path(comol.cli.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "comol", "eval", "math", "--data", f"x={tmp_path / 'missing.json'}"]
    args += ["--predictions", str(tmp_path / "p.jsonl")]
    quiet = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert quiet.returncode == 2
    errors = [line for line in quiet.stderr.splitlines() if line.startswith("comol: error:")]
    expected = f"comol: error: {tmp_path / 'missing.json'}: no such file; give the path of a JSON or JSONL dataset file."
    assert errors == [expected] and "Traceback" not in quiet.stderr
    loud = subprocess.run(
        [*args, "--verbose"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert loud.returncode == 2 and "Traceback" in loud.stderr


def test_unknown_option_rejected_and_verbose_after_subcommand(tmp_path, capsys) -> None:
    data, preds = _write_data(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "math", "--data", f"gsm8k={data}", "--predictions", str(preds), "--bogus", "1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    assert main(["eval", "math", "--data", f"gsm8k={data}", "--predictions", str(preds), "--verbose"]) == 0


def test_model_that_cannot_load_exit_2(tmp_path, capsys) -> None:
    data, _ = _write_data(tmp_path)
    assert main(["eval", "math", "--model", str(tmp_path / "no-model"), "--data", f"gsm8k={data}"]) == 2
    assert f"--model {tmp_path / 'no-model'}: cannot load" in _error_line(capsys)
