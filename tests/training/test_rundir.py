"""Run directories: complete checkpoints only, an unchanged config on resume, no silent overwrite.

One tiny run is trained once per module; each test works on a copy of its directory. Refusals happen
before the model is loaded (``ModelConfig.load_model`` is made to fail to prove it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from comol.cli import main
from comol.training.config import ModelConfig, TrainConfig, load_config
from comol.training.run import train
from comol.training.rundir import RESUMABLE_KEYS, check_checkpoint

from .tiny import tiny_overrides


@pytest.fixture(scope="module")
def finished_run(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A finished 4-step LoRA run: checkpoint-2, checkpoint-4, adapter/, metrics.json, config.yaml."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, tiny_overrides(tiny_model_dir, arithmetic_file, out)))
    return out


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ModelConfig) -> None:
        raise AssertionError("the model was loaded before the run directory was checked")

    monkeypatch.setattr(ModelConfig, "load_model", refuse)


def _config(run_dir: Path, *overrides: str) -> TrainConfig:
    """The run's saved config with ``overrides``, pointed at ``run_dir``."""
    return load_config(run_dir / "config.yaml", [f"train.output_dir={run_dir}", *overrides])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda ck: (ck / "optimizer.pt").unlink(), "optimizer.pt"),
        (lambda ck: (ck / "scheduler.pt").unlink(), "scheduler.pt"),
        (lambda ck: (ck / "rng_state.pth").unlink(), "rng_state.pth"),
        (lambda ck: (ck / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
        (lambda ck: _truncate(ck / "optimizer.pt"), "optimizer.pt"),
        (lambda ck: _truncate(ck / "adapter_model.safetensors"), "adapter_model.safetensors"),
        (lambda ck: _truncate(ck / "trainer_state.json"), "trainer_state.json"),
    ],
    ids=["no-optimizer", "no-scheduler", "no-rng", "no-weights", "cut-optimizer", "cut-weights", "cut-state"],
)
def test_an_incomplete_checkpoint_is_refused_naming_the_file(
    run_dir: Path, no_model_loading: None, damage, named: str
) -> None:
    damage(run_dir / "checkpoint-4")
    with pytest.raises(ValueError, match=named) as info:
        train(_config(run_dir, "train.max_steps=6"), resume=True)
    assert "checkpoint-4" in str(info.value)
    with pytest.raises(ValueError, match=named):
        train(_config(run_dir, "train.max_steps=6"), resume=run_dir / "checkpoint-4")


def test_a_flipped_byte_in_the_optimizer_is_caught(run_dir: Path) -> None:
    path = run_dir / "checkpoint-4" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"optimizer\.pt is damaged"):
        check_checkpoint(run_dir / "checkpoint-4")
    check_checkpoint(run_dir / "checkpoint-2")  # the earlier one is whole


def test_the_cli_refuses_an_incomplete_checkpoint_with_exit_code_2(
    run_dir: Path, no_model_loading: None, caplog: pytest.LogCaptureFixture
) -> None:
    (run_dir / "checkpoint-4" / "optimizer.pt").unlink()
    code = main(["train", "--resume", str(run_dir / "config.yaml"), f"train.output_dir={run_dir}"])
    assert code == 2
    assert "optimizer.pt (the optimizer state) is missing" in caplog.text


def test_resume_refuses_a_config_that_changes_the_run(run_dir: Path, no_model_loading: None) -> None:
    saved = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.json", "run_info.json")}
    config = _config(run_dir, "train.learning_rate=0.5", "train.seed=99", "train.max_steps=6")
    with pytest.raises(
        ValueError, match=r"train\.learning_rate: 0\.01 -> 0\.5; train\.seed: 42 -> 99"
    ) as info:
        train(config, resume=True)
    assert "train.max_steps" not in str(info.value).split("(", 1)[1].split(")")[0]  # allowed, not listed
    assert "--allow-config-change" in str(info.value)
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved


def test_resume_continues_a_longer_run_and_records_forced_changes(run_dir: Path) -> None:
    assert "train.max_steps" in RESUMABLE_KEYS
    longer = train(_config(run_dir, "train.max_steps=6"), resume=True)
    assert (run_dir / "checkpoint-6").is_dir()
    assert load_config(run_dir / "config.yaml").train.max_steps == 6
    info = json.loads((run_dir / "run_info.json").read_text())
    (entry,) = info["resumes"]
    assert entry["checkpoint"].endswith("checkpoint-4")
    assert entry["config_changes"]["train.max_steps"] == {"saved": 4, "new": 6}
    assert set(entry["config_changes"]) == {"train.max_steps", "train.output_dir"}  # (a copied run)
    assert longer.metrics["train_loss"] > 0

    forced = _config(run_dir, "train.max_steps=8", "train.learning_rate=0.02")
    train(forced, resume=True, allow_config_change=True)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert [e["checkpoint"][-12:] for e in info["resumes"]] == ["checkpoint-4", "checkpoint-6"]
    assert info["resumes"][1]["config_changes"]["train.learning_rate"] == {"saved": 0.01, "new": 0.02}
    assert load_config(run_dir / "config.yaml").train.learning_rate == 0.02


def test_a_finished_run_without_checkpoints_is_not_overwritten(
    run_dir: Path, finished_run: Path, no_model_loading: None
) -> None:
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    config = _config(run_dir)
    with pytest.raises(ValueError, match=r"already holds a run \(adapter/, metrics.json\).*--overwrite"):
        train(config)
    with pytest.raises(ValueError, match=r"nothing to resume.*--overwrite"):
        train(config, resume=True)
    with pytest.raises(ValueError, match="not both"):
        train(config, resume=True, overwrite=True)
    other = finished_run / "checkpoint-2"  # a checkpoint of another run, continued into this directory
    with pytest.raises(ValueError, match=r"already holds another run .*choose another train\.output_dir"):
        train(config, resume=other)
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_overwrite_replaces_the_run_and_nothing_else(run_dir: Path) -> None:
    (run_dir / "notes.txt").write_text("mine")
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    train(_config(run_dir, "train.max_steps=2", "train.seed=7"), overwrite=True)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() != before
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "resumes" not in json.loads((run_dir / "run_info.json").read_text())


def test_resume_flag_takes_no_value_so_the_yaml_is_the_config(tmp_path: Path) -> None:
    from comol.cli import build_parser

    args = build_parser().parse_args(["train", "--resume", "cfg.yaml", "train.max_steps=5"])
    assert (args.config, args.overrides, args.resume, args.resume_from) == (
        "cfg.yaml",
        ["train.max_steps=5"],
        True,
        None,
    )
    args = build_parser().parse_args(["train", "--resume-from", "run/checkpoint-2", "cfg.yaml"])
    assert (args.config, args.resume_from) == ("cfg.yaml", "run/checkpoint-2")


def test_an_output_dir_that_is_a_file_is_refused_before_loading(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, no_model_loading: None
) -> None:
    target = tmp_path / "taken"
    target.write_text("not a directory")
    config = load_config(None, tiny_overrides(tiny_model_dir, arithmetic_file, target))
    with pytest.raises(ValueError, match="taken is a file; choose a directory"):
        train(config)
    nested = load_config(None, tiny_overrides(tiny_model_dir, arithmetic_file, target / "run"))
    with pytest.raises(ValueError, match="taken is a file"):
        train(nested)
    assert target.read_text() == "not a directory"
