"""benchmarks/compose_experiment.py end to end on a tiny Llama (every variant runs; figures are meaningless)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from training.tiny import make_char_tokenizer, make_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compose_experiment.py"


@pytest.mark.slow
def test_compose_experiment_runs_every_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("compose_experiment", SCRIPT)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    tokenizer = make_char_tokenizer()
    tokenize = experiment.tokenize_record
    monkeypatch.setattr(experiment, "locate_smollm2", lambda: ("tiny", None))
    monkeypatch.setattr(experiment, "load_tokenizer", lambda *a: tokenizer)
    monkeypatch.setattr(experiment, "load_smollm2", lambda: make_tiny_model(len(tokenizer)))
    monkeypatch.setattr(
        experiment, "tokenize_record", lambda r, t, max_length: tokenize(r, t, max_length=1024)
    )
    args = ["--threads", "1", "--lora-steps", "2", "--mixed-steps", "2", "--n-train", "12", "--n-test", "2"]
    assert experiment.main([*args, "--mixed-per-task", "3", "--top-layers", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "compose_experiment.json").read_text())
    assert payload["complete"] is True
    assert len(payload["results"]) == 10 and all(len(row) == 4 for row in payload["results"].values())
    assert "| composed CoMoL, router trained |" in (tmp_path / "compose_experiment.md").read_text()
