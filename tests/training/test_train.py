"""End-to-end training on a tiny Llama: run directory, adapters, logging, aux loss, resume, fail-fast, TRL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from comol.training.config import load_config
from comol.training.run import train
from comol.training.trainer import STAGING_DIR, ComolTrainer, last_checkpoint

from .tiny import tiny_overrides


def _config(model_dir: Path, data_file: Path, output_dir: Path, **extra: object):
    return load_config(None, tiny_overrides(model_dir, data_file, output_dir, **extra))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_lora_run_directory_and_reload(tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "run", **{"data.val_size": 8})
    result = train(config)
    out = result.output_dir
    assert {"config.yaml", "run_info.json", "metrics.json", "adapter", "checkpoint-4"} <= {
        p.name for p in out.iterdir()
    }
    assert load_config(out / "config.yaml") == config  # the resolved config re-runs as is
    info = json.loads((out / "run_info.json").read_text())
    assert {"torch", "transformers", "peft", "python"} <= set(info["versions"])
    assert "git_commit" in info
    assert "eval_loss" in result.metrics
    logs = [entry for entry in result.log_history if "loss" in entry]
    assert logs and all("tokens_per_second" in e and "learning_rate" in e for e in logs)
    # The saved adapter reproduces the trained model.
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    result.model.eval()
    expected = result.model(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected)
    # A second fresh run into the same directory is refused.
    with pytest.raises(
        ValueError, match=r"already holds a run \(checkpoint-2, checkpoint-4, adapter/, metrics.json\)"
    ):
        train(config)


class _Interrupt(TrainerCallback):
    """Simulates a crash right after ``step`` optimiser steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_gives_the_same_adapter(tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path) -> None:
    extra = {"train.max_steps": 6, "adapter.options.lora_dropout": 0.1, "train.lr_scheduler": "cosine"}
    reference = train(_config(tiny_model_dir, arithmetic_file, tmp_path / "straight", **extra))

    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "interrupted", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[_Interrupt(step=3)])
    assert last_checkpoint(config.train.output_dir).name == "checkpoint-2"
    # A half-written checkpoint (as left by a crash mid-save) is never picked.
    (Path(config.train.output_dir) / "checkpoint-5").mkdir()
    (Path(config.train.output_dir) / STAGING_DIR / "checkpoint-3").mkdir(parents=True)
    assert last_checkpoint(config.train.output_dir).name == "checkpoint-2"
    resumed = train(config, resume=True)

    expected, got = _adapter(reference.adapter_dir), _adapter(resumed.adapter_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert expected["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    final_loss = [e["loss"] for e in reference.log_history if "loss" in e][-1]
    assert final_loss == pytest.approx([e["loss"] for e in resumed.log_history if "loss" in e][-1], rel=1e-5)


def test_comol_logs_router_stats_and_aux_loss(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path
) -> None:
    extra = {
        "adapter.method": "comol",
        "adapter.options": "{num_experts: 4, aux_loss_coef: 0.01}",
        "train.report_to": "[tensorboard]",
        "train.max_steps": 2,
    }
    result = train(_config(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))
    logs = [entry for entry in result.log_history if "loss" in entry]
    for entry in logs:
        assert {"router_entropy", "router_load_max", "router_load_min", "aux_loss"} <= set(entry)
        assert 0 < entry["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4
        assert entry["router_active_experts"] == 4.0  # soft routing: every expert of every token
        assert entry["router_load_min"] <= 0.25 <= entry["router_load_max"]
        assert entry["aux_loss"] > 0
    events = list((result.output_dir / "runs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert any(t.endswith("router_entropy") for t in tags)
    assert any(t.startswith("router/") and t.endswith("q_proj/entropy") for t in tags)
    assert any(t.startswith("router/") and t.endswith("q_proj/active_experts") for t in tags)


def test_sparsemoa_trains_its_block_routers(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path
) -> None:
    """Through the Trainer: one router per decoder block is logged; the router, the parallel adapter and the
    LoRA experts train, while the threshold network (zero gradient, no weight decay) keeps its values."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = {
        "adapter.method": "sparsemoa",
        "train.max_steps": 3,
        "train.save_steps": 1,
        "train.weight_decay": 0.0,
    }
    result = train(_config(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))
    logs = [entry for entry in result.log_history if "loss" in entry]
    assert logs and all(0 < entry["router_active_experts"] <= 6 for entry in logs)
    trained = _adapter(result.adapter_dir)
    after_two_steps = _adapter(result.output_dir / "checkpoint-2")  # the last step changes all but tau
    assert trained.keys() == after_two_steps.keys()
    assert any(".moa_block.sparsemoa_router_down." in key for key in trained)
    assert any(".moa_block.sparsemoa_threshold." in key for key in trained)
    for key, value in trained.items():
        moved = not torch.equal(value, after_two_steps[key])
        assert moved != ("sparsemoa_threshold" in key), key
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    result.model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, result.model(**batch).logits)


def test_aux_loss_is_added_to_the_training_loss(tiny_model_dir: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM, TrainingArguments

    import comol
    from comol.methods import build_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = peft.get_peft_model(
        base,
        build_config("comol", r=4, lora_alpha=4, num_experts=4, aux_loss_coef=0.5, target_modules=["q_proj"]),
    )
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    trainer = ComolTrainer(model=model, args=args)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    lm_loss = model(**batch).loss
    aux = comol.collect_aux_loss(model)
    assert aux is not None and aux > 0
    torch.testing.assert_close(loss, lm_loss + aux)
    model.eval()  # evaluation loss is the LM loss only
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"adapter.target_modules": "[q_proj,attn_qkv]"}, r"Target module\(s\) \['attn_qkv'\] not found"),
        ({"data.max_length": 40}, "Raise data.max_length above"),
        ({"adapter.method": "nosuch"}, "Unknown method"),
        ({"adapter.options.nosuch": 1}, "no option"),
    ],
)
def test_bad_input_fails_before_training(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, extra: dict, message: str
) -> None:
    config = _config(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra)
    with pytest.raises(ValueError, match=message):
        train(config)
    assert last_checkpoint(tmp_path / "run") is None


def test_missing_fields_fail_before_loading(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n')
    config = load_config(
        None, ["model.name_or_path=/does/not/exist", f"data.train={bad}", f"train.output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="has no \\['output'\\]"):
        train(config)  # fails on the data, before trying to load the (missing) model


@pytest.mark.slow
def test_trl_sft_trainer_with_comol(tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    extra = {
        "adapter.method": "comol",
        "adapter.options": "{num_experts: 4, aux_loss_coef: 0.01}",
        "train.trainer": "trl",
        "train.max_steps": 3,
        "data.val_size": 4,
    }
    result = train(_config(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))
    assert type(result.model).__name__.startswith("PeftModel")
    logs = [entry for entry in result.log_history if "loss" in entry]
    assert logs and all("router_entropy" in e and "aux_loss" in e for e in logs)
    assert "eval_loss" in result.metrics
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_flylora_balancing_bias_moves_during_training(
    tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path
) -> None:
    """The Trainer runs the adapters' after-step updates: FlyLoRA's bias leaves zero after training."""
    extra = {
        "adapter.method": "flylora",
        "adapter.r": 8,
        "adapter.options": "{top_k: 2}",
        "train.max_steps": 2,
    }
    result = train(_config(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))
    biases = [b for name, b in result.model.named_buffers() if "flylora_bias" in name]
    assert biases and any(bool(b.abs().sum() > 0) for b in biases)
