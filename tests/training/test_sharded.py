"""FSDP2 and DeepSpeed ZeRO-2/3 through the shipped accelerate configs, 2 processes on CPU (gloo).

Each test runs ``accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2
sharded_worker.py ...`` and checks that the adapter parameters (CoMoL's cores and router included) really
were sharded during training, that the final adapter is saved whole (full shapes, loadable with peft) and
that it equals a single-process run over the same global batch. As in ``test_ddp.py``, the runs use plain
SGD, whose update is linear in the gradient, so the sharded runs' different float summation order stays
at rounding level instead of being amplified by Adam.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import comol  # noqa: F401  (registers comol's methods with peft, for PeftModel.from_pretrained)
from comol.training.config import load_config
from comol.training.run import train

from .tiny import tiny_overrides

WORKER = Path(__file__).with_name("sharded_worker.py")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
SGD_LR = 10.0
RTOL, ATOL = 1e-5, 1e-6
METHOD_KEYS = {
    "lora": ("lora_A", "lora_B"),
    "comol": ("comol_A", "comol_B", "comol_cores", "comol_router"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _common(method: str, **extra: object) -> dict[str, object]:
    common: dict[str, object] = {
        "adapter.method": method,
        "train.max_steps": 3,
        "train.gradient_accumulation_steps": 1,
        "train.save_steps": 2,
        "train.optim": "sgd",
        "train.learning_rate": SGD_LR,
    }
    if method == "comol":
        common["adapter.options"] = "{num_experts: 4}"  # no balancing loss: see test_ddp.py
    common.update(extra)
    return common


def _launch(
    config: str, dump_dir: Path, overrides: list[str], resume: Path | None = None
) -> list[dict[str, Any]]:
    """Run the worker under ``accelerate launch`` with a shipped config; return both ranks' dumps."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(WORKER),
        str(dump_dir),
        *(["--resume", str(resume)] if resume is not None else []),
        *overrides,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(dump_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, arithmetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Single-process adapter over the same global batch (4 = 2 ranks x 2), one per method, cached."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(method: str) -> dict[str, torch.Tensor]:
        if method not in cache:
            out = tmp_path_factory.mktemp(f"single-{method}")
            overrides = tiny_overrides(
                tiny_model_dir, arithmetic_file, out, **_common(method), **{"train.micro_batch_size": 4}
            )
            model = train(load_config(None, overrides)).model
            cache[method] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return cache[method]

    return get


def _check_adapter(
    run_dir: Path, ranks: list[dict[str, Any]], expected: dict[str, torch.Tensor], model_dir: Path
) -> None:
    """The saved adapter is whole, equals the reference, matches both ranks and loads with peft."""
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert saved[key].shape == value.shape, key  # gathered in full, not one rank's shard
        torch.testing.assert_close(saved[key], value, rtol=RTOL, atol=ATOL)
    ups = [k for k in expected if ".lora_B." in k or ".comol_B." in k]
    assert ups and all(expected[k].abs().max() > 100 * ATOL for k in ups)  # trained away from zero init
    for rank in ranks:
        assert rank["state"].keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(rank["state"][key], value, rtol=0, atol=0)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir / "adapter")
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def _adapter_params(rank: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    params = rank["params"]
    for key in METHOD_KEYS[method]:
        assert any(f".{key}." in name for name in params), f"no {key} parameter recorded"
    return params


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "comol"])
def test_fsdp2_matches_single_process(
    method: str, tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, reference: Any
) -> None:
    run_dir = tmp_path / "fsdp"
    overrides = tiny_overrides(
        tiny_model_dir, arithmetic_file, run_dir, **_common(method), **{"train.micro_batch_size": 2}
    )
    ranks = _launch("fsdp", tmp_path / "dump", overrides)
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.FSDP"
        for name, param in _adapter_params(rank, method).items():
            # FSDP2: a DTensor sharded on dim 0, each rank holding half of the rows.
            assert param["kind"] == "dtensor", name
            assert param["placements"] == ["S(0)"], name
            assert param["local"][0] == param["shape"][0] // 2, name
            assert param["local"][1:] == param["shape"][1:], name
    _check_adapter(run_dir, ranks, reference(method), tiny_model_dir)
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_fsdp2_resumes_from_a_checkpoint(tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path) -> None:
    # AdamW here: the checkpoint must restore sharded optimizer state too (and torch cannot load a
    # full-state-dict checkpoint of a stateless optimizer such as plain SGD: "Expected device to be set").
    common = _common("comol", **{"train.optim": "adamw_torch", "train.learning_rate": 1e-2})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    kwargs = {**common, "train.micro_batch_size": 2}
    _launch("fsdp", tmp_path / "dump-whole", tiny_overrides(tiny_model_dir, arithmetic_file, whole, **kwargs))
    checkpoint = whole / "checkpoint-2"
    _launch(
        "fsdp",
        tmp_path / "dump-resumed",
        tiny_overrides(tiny_model_dir, arithmetic_file, resumed, **kwargs),
        resume=checkpoint,
    )
    final = load_file(whole / "adapter" / "adapter_model.safetensors")
    after_resume = load_file(resumed / "adapter" / "adapter_model.safetensors")
    at_checkpoint = load_file(checkpoint / "adapter_model.safetensors")
    assert after_resume.keys() == final.keys()
    for key, value in final.items():
        torch.testing.assert_close(after_resume[key], value, rtol=RTOL, atol=ATOL)
    # The resumed run did train the last step (the checkpoint is not already the final adapter).
    assert max((final[k] - at_checkpoint[k]).abs().max() for k in final) > 100 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", ["lora", "comol"])
def test_deepspeed_matches_single_process(
    stage: int, method: str, tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path, reference: Any
) -> None:
    pytest.importorskip("deepspeed", reason="needs `pip install deepspeed`")
    run_dir = tmp_path / f"zero{stage}"
    overrides = tiny_overrides(
        tiny_model_dir, arithmetic_file, run_dir, **_common(method), **{"train.micro_batch_size": 2}
    )
    ranks = _launch(f"deepspeed_zero{stage}", tmp_path / "dump", overrides)
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.DEEPSPEED"
        params = _adapter_params(rank, method)
        if stage == 2:
            # Parameters are replicated; the fp32 optimiser partition holds half of the trainable ones.
            assert all(p["kind"] == "plain" for p in params.values())
            assert rank["zero2"]["partition"] * 2 == rank["zero2"]["trainable"]
        else:
            # Every adapter parameter is partitioned: this rank owns half of its elements.
            for name, param in params.items():
                assert param["kind"] == "zero3", name
                full = torch.Size(param["shape"]).numel()
                assert torch.Size(param["local"]).numel() == (full + 1) // 2, name
    _check_adapter(run_dir, ranks, reference(method), tiny_model_dir)
