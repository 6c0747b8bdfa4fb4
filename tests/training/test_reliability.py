"""What ``comol train`` guarantees when things go wrong: divergence stops the run (or skips a bad step, never
silently) and nothing non-finite is saved; bad numbers, files and lengths are refused up front with one line
naming the key or file (exit 2 on the command line, no traceback)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from comol.cli import main
from comol.errors import UserError
from comol.training.config import load_config
from comol.training.data import check_max_length, load_records, position_limit
from comol.training.run import train
from comol.training.trainer import DIVERGED_EXIT_CODE, TrainingDivergedError, last_checkpoint

from .tiny import make_char_tokenizer, tiny_overrides


def _config(model_dir: Path, data_file: Path, output_dir: Path, **extra: object):
    return load_config(None, tiny_overrides(model_dir, data_file, output_dir, **extra))


def _all_finite(directory: Path) -> bool:
    tensors = load_file(directory / "adapter_model.safetensors")
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors.values())


# ---- divergence -------------------------------------------------------------------------------------------
def test_diverging_run_stops_with_its_own_exit_code_and_saves_nothing_non_finite(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir, arithmetic_file, out, **{"train.learning_rate": 1e6, "train.max_steps": 6}
    )
    assert main(["train", *overrides]) == DIVERGED_EXIT_CODE
    assert "Training diverged at optimiser step" in caplog.text
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    for checkpoint in out.glob("checkpoint-*"):  # whatever was saved before the divergence is finite
        assert _all_finite(checkpoint)


class _NanLossAt(TrainerCallback):
    """Makes every forward of optimiser step ``step`` (1-based) return NaN logits, hence a NaN loss, and
    records the trainable weights around that step."""

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        self.step, self.active = step, False
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        model.lm_head.register_forward_hook(lambda _m, _i, out: out * float("nan") if self.active else out)

    @staticmethod
    def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.active = state.global_step + 1 == self.step
        if self.active:
            self.before = self._weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.active:
            self.after = self._weights(model)
        self.active = False


def _tiny(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_first_non_finite_loss_stops_training_before_its_update(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path
) -> None:
    model = _tiny(tiny_model_dir)
    nan = _NanLossAt(model, step=3)
    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "run")
    with pytest.raises(TrainingDivergedError, match="optimiser step 3"):
        train(config, model=model, callbacks=[nan])
    assert nan.before and not nan.after  # stopped inside step 3
    assert last_checkpoint(tmp_path / "run").name == "checkpoint-2"  # the step-2 checkpoint is kept
    assert not (tmp_path / "run" / "adapter").exists()


def test_max_bad_steps_skips_a_bad_step_with_a_warning_and_counts_it(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny(tiny_model_dir)
    nan = _NanLossAt(model, step=2)
    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "run", **{"train.max_bad_steps": 1})
    result = train(config, model=model, callbacks=[nan])
    assert "Skipping optimiser step 2" in caplog.text
    assert result.metrics["bad_steps"] == 1
    assert json.loads((result.output_dir / "metrics.json").read_text())["bad_steps"] == 1
    assert nan.before and nan.after
    for name, weight in nan.before.items():  # the bad step's update was dropped, not applied
        torch.testing.assert_close(nan.after[name], weight, rtol=0, atol=0)
    assert _all_finite(result.adapter_dir)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.log_history if "loss" in e)


class _PoisonWeights(TrainerCallback):
    """Writes a NaN into a trainable weight after optimiser step ``step`` or at the end of training, as a
    broken non-gradient update would."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    @staticmethod
    def _poison(model: torch.nn.Module) -> None:
        param = next(p for p in model.parameters() if p.requires_grad)
        with torch.no_grad():
            param.view(-1)[0] = float("nan")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self._poison(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.step is None:
            self._poison(model)


@pytest.mark.parametrize(("step", "missing"), [(2, "checkpoint-2"), (None, "adapter")])
def test_non_finite_weights_are_never_saved(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, step: int | None, missing: str
) -> None:
    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "run")
    with pytest.raises(TrainingDivergedError, match="Refusing to save"):
        train(config, callbacks=[_PoisonWeights(step)])
    assert not (tmp_path / "run" / missing).exists()
    for checkpoint in (tmp_path / "run").glob("checkpoint-*"):
        assert _all_finite(checkpoint)


# ---- config numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.learning_rate", "inf"),
        ("train.learning_rate", ".inf"),
        ("train.learning_rate", "nan"),
        ("train.max_grad_norm", ".nan"),
        ("train.weight_decay", "-0.1"),
        ("train.max_grad_norm", "-1"),
        ("train.seed", "-1"),
        ("train.max_bad_steps", "-1"),
        ("train.dataloader_num_workers", "-2"),
        ("data.val_size", "inf"),
        ("adapter.lora_alpha", "-8"),
    ],
)
def test_invalid_numbers_are_rejected_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(UserError, match=re.escape(key) + " must"):
        load_config(None, ["model.name_or_path=m", "data.train=d.json", f"{key}={value}"])


# ---- checks before training -------------------------------------------------------------------------------
def test_max_length_above_the_position_limit_is_refused_before_training(
    arithmetic_file: Path, tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_char_tokenizer()
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    )
    config = _config(
        Path("unused"), arithmetic_file, tmp_path / "run", **{"adapter.target_modules": "[c_attn]"}
    )
    with pytest.raises(UserError, match=r"data\.max_length=320 exceeds the model's position limit of 64"):
        train(config, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run").exists()


def test_position_limit_is_read_from_the_config_and_absent_means_no_check() -> None:
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    assert position_limit(GPT2Config(n_positions=64)) == 64
    assert position_limit(LlamaConfig(max_position_embeddings=128)) == 128
    assert position_limit(PretrainedConfig()) is None
    check_max_length(10**6, PretrainedConfig())  # no limit: nothing to check
    check_max_length(64, GPT2Config(n_positions=64))
    with pytest.raises(UserError, match=r"data\.max_length=65 .* 64 tokens"):
        check_max_length(65, GPT2Config(n_positions=64))


# ---- messages instead of tracebacks -----------------------------------------------------------------------
def _run_cli(args: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> str:
    """Runs ``comol train`` expecting exit 2; returns the one error line."""
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out + caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    errors += [line for line in captured.err.splitlines() if line.startswith("comol: error")]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_yaml_syntax_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n\tname_or_path: m\n")  # a tab indents line 2
    message = _run_cli([str(path)], capsys, caplog)
    assert str(path) in message and "line 2" in message


def test_output_dir_that_is_a_file_is_refused_before_the_model_loads(
    arithmetic_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    args = ["model.name_or_path=/nonexistent/model", f"data.train={arithmetic_file}"]
    for output_dir in (taken, taken / "run"):
        message = _run_cli([*args, f"train.output_dir={output_dir}"], capsys, caplog)
        caplog.clear()
        assert "train.output_dir" in message and "is a file" in message  # not a model-loading error
    assert taken.read_text() == "my notes"


def test_non_utf8_data_file_names_the_file_and_the_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(UserError, match=r"data\.jsonl: not UTF-8 text \(byte 56, line 2\)"):
        load_records(str(path))
    message = _run_cli(["model.name_or_path=m", f"data.train={path}", "--dry-run"], capsys, caplog)
    assert str(path) in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bad_json_line_is_reported_at_its_own_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    good = '{"instruction": "a", "output": "b"}'
    text = f"{good}\n{{bad\n" if suffix == ".jsonl" else f"[{good},\n{{bad]\n"
    path.write_text(text)
    # JSON Lines: "data.jsonl:2: not valid JSON ..."; a JSON list: "... (... at line 2, column 1)"
    with pytest.raises(UserError, match=r"(\.jsonl:|line )2\b") as info:
        load_records(str(path))
    assert str(path) in str(info.value) and "line 1" not in str(info.value) and ":1:" not in str(info.value)


def test_verbose_shows_the_traceback_of_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n\tname_or_path: m\n")
    assert main(["--verbose", "train", str(path)]) == 2
    assert "Traceback" in capsys.readouterr().err + caplog.text
