"""Layer level: forward + backward time and memory kept for backward of one adapted projection."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from comol.bench.config import BenchConfig
from comol.bench.memory import peak_device_memory, reset_peak_device_memory, saved_tensor_bytes
from comol.bench.timing import interleaved_medians
from comol.bench.variants import Variant, build_adapted, trainable

logger = logging.getLogger(__name__)


class _Proj(nn.Module):
    """One frozen projection, the unit the layer benchmark adapts (``target_modules=["proj"]``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d_in) -> (N, d_out)``."""
        return self.proj(x)


def layer_variants(num_experts: int) -> list[Variant]:
    """Everything the layer table compares at ``E = num_experts``."""
    import comol

    available = set(comol.method_names())
    variants = [
        Variant("base", None, uses_experts=False),
        Variant("lora", "lora", uses_experts=False),
        Variant("comol", "comol", {"num_experts": num_experts}),
        Variant("comol (eager)", "comol", {"num_experts": num_experts}, implementation="eager"),
        Variant("comol w/o CR", "comol", {"num_experts": num_experts, "core_router": False}),
        Variant("comol stacked", "comol", {"num_experts": num_experts}, implementation="stacked"),
    ]
    for name in ("molora", "hydralora"):
        if name in available:
            variants.append(Variant(name, name, {"num_experts": num_experts}))
    return variants


def bench_layers(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Forward+backward time and memory kept for backward of one adapted projection."""
    rows = []
    for d_in, d_out in cfg.shapes:
        for n in cfg.tokens:
            for r in cfg.ranks:
                for num_experts in cfg.experts:
                    rows.extend(_bench_layer_group(cfg, device, dtype, d_in, d_out, n, r, num_experts))
                    gc.collect()
    return rows


def _bench_layer_group(
    cfg: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    d_in: int,
    d_out: int,
    n: int,
    r: int,
    num_experts: int,
) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    base_weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    x = torch.randn(n, d_in, generator=gen).to(device, dtype).requires_grad_()  # inside a network: needs grad
    grad = torch.randn(n, d_out, generator=gen).to(device, dtype)
    models: dict[str, nn.Module] = {}
    errors: dict[str, str] = {}
    for variant in layer_variants(num_experts):
        torch.manual_seed(cfg.seed)
        module = _Proj(d_in, d_out)
        with torch.no_grad():
            module.proj.weight.copy_(base_weight)
        try:
            model = build_adapted(module, variant, r, ["proj"])
        except Exception as err:  # a baseline under development must not stop the suite
            errors[variant.label] = f"{type(err).__name__}: {err}"
            logger.warning("layer bench: %s unavailable (%s)", variant.label, errors[variant.label])
            continue
        models[variant.label] = model.to(device=device, dtype=dtype).train()

    def step(model: nn.Module) -> Callable[[], None]:
        params = trainable(model)

        def run() -> None:
            out = model(x)
            torch.autograd.backward(out, grad)
            x.grad = None
            for p in params:
                p.grad = None

        return run

    times = interleaved_medians({k: step(m) for k, m in models.items()}, device, cfg.repeats, cfg.warmup)
    rows = []
    for label, model in models.items():
        excluded = list(model.parameters()) + list(model.buffers())
        reset_peak_device_memory(device)
        with saved_tensor_bytes(exclude=excluded) as saved:
            out = model(x)
        peak_fwd = peak_device_memory(device)
        torch.autograd.backward(out, grad)
        del out
        peak = peak_device_memory(device)
        x.grad = None
        for p in model.parameters():
            p.grad = None
        rows.append(
            {
                "variant": label,
                "d_in": d_in,
                "d_out": d_out,
                "tokens": n,
                "r": r,
                "E": num_experts,
                **times[label],
                "saved_bytes": saved.bytes,
                "peak_bytes": peak,
                "peak_forward_bytes": peak_fwd,
                "trainable_params": sum(p.numel() for p in trainable(model)),
            }
        )
    for label, message in errors.items():
        rows.append({"variant": label, "d_in": d_in, "d_out": d_out, "tokens": n, "r": r, "E": num_experts,
                     "error": message})  # fmt: skip
    return rows
