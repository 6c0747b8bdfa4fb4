"""2-process DDP on CPU (gloo): both ranks end identical and equal to one process over the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from comol.training.config import load_config
from comol.training.run import train

from .tiny import ATOL, RTOL, SGD_COMPARISON, free_port, launch_env, tiny_overrides

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "comol"])
def test_ddp_matches_single_process(
    method: str, tiny_model_dir: Path, arithmetic_file: Path, tmp_path: Path
) -> None:
    # Plain SGD with a large learning rate (see tiny.SGD_COMPARISON); the B weights must really move.
    common = {
        "adapter.method": method,
        **SGD_COMPARISON,
    }
    if method == "comol":
        # No balancing loss here: it is a non-linear function of the batch, so its mean over two half
        # batches differs (slightly) from its value on the whole batch by design.
        common["adapter.options"] = "{num_experts: 4}"
    ddp = tiny_overrides(
        tiny_model_dir, arithmetic_file, tmp_path / "ddp", **common, **{"train.micro_batch_size": 2}
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
        *ddp,
    ]
    done = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rank0, rank1 = ranks[0]["state"], ranks[1]["state"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0)
    # The saved adapter and checkpoints were written once, by rank 0.
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").is_file()

    single = tiny_overrides(
        tiny_model_dir, arithmetic_file, tmp_path / "single", **common, **{"train.micro_batch_size": 4}
    )
    reference = get_peft_model_state_dict(train(load_config(None, single)).model)
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key].detach(), rtol=RTOL, atol=ATOL)
    assert_b_moved(rank0)


def assert_b_moved(state: dict[str, torch.Tensor], factor: float = 100.0) -> None:
    """Every up-projection (``lora_B`` / ``comol_B``, initialised to zero) moved far beyond the tolerance."""
    ups = {k: v for k, v in state.items() if ".lora_B." in k or ".comol_B." in k}
    assert ups, f"no B weights among {sorted(state)[:5]}..."
    for key, value in ups.items():
        assert value.abs().max() > factor * ATOL, f"{key} barely moved from its zero init"
