"""What ``comol bench`` measures (:class:`BenchConfig`) and the environment recorded with every result."""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from comol.loading import resolve_dtype

# Qwen3-8B projection shapes (d_in, d_out): q/o (4096 -> 4096), k/v (4096 -> 1024), down (12288 -> 4096).
QWEN3_8B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 1024), (12288, 4096))


@dataclass
class BenchConfig:
    """What to measure. The defaults are the full grid (meant for a GPU); :meth:`quick` is for CPUs."""

    shapes: list[tuple[int, int]] = field(default_factory=lambda: list(QWEN3_8B_SHAPES))
    tokens: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32])
    experts: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    kernel_tokens: int = 8192  # core-mix kernel comparison (comol vs stacked cores)
    repeats: int = 10
    warmup: int = 2
    model_level: bool = True
    smollm2: bool = True
    train_batch: int = 8
    train_seq: int = 512
    smollm2_batch: int = 8
    smollm2_seq: int = 512
    decode_tokens: int = 32
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    # also time LoRA and CoMoL E=8 compiled by torch.compile(fullgraph=True): a training step and cached decoding
    compiled_step: bool = True
    compiled_models: list[str] = field(default_factory=lambda: ["tiny-llama"])
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    threads: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A subset that finishes in a few minutes on two CPU cores."""
        base = cls(
            shapes=[(4096, 1024)],
            tokens=[512],
            ranks=[16],
            experts=[8, 64],
            kernel_tokens=8192,
            repeats=5,
            warmup=1,
            train_batch=4,
            train_seq=128,
            smollm2_batch=4,
            smollm2_seq=128,
            decode_tokens=16,
            decode_batches=[1, 8],
        )
        for key, value in overrides.items():
            setattr(base, key, value)
        return base

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and thread count, recorded with every result."""
    import peft
    import transformers

    import comol

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "comol": comol.__version__,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = f"CPU ({env['processor']}, {os.cpu_count()} cores visible)"
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    return env
