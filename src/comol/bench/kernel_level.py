"""Kernel level: routing and core mixing alone (no A/B, no base layer), every registered implementation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from comol.bench.config import BenchConfig
from comol.bench.memory import saved_tensor_bytes
from comol.bench.timing import interleaved_medians


def bench_kernels(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Routing + core mixing alone (no A/B, no base layer): every registered implementation vs stacked."""
    rows = []
    for r in cfg.ranks:
        for num_experts in cfg.experts:
            rows.extend(_bench_kernel_group(cfg, device, dtype, r, num_experts))
    return rows


def _bench_kernel_group(
    cfg: BenchConfig, device: torch.device, dtype: torch.dtype, r: int, num_experts: int
) -> list[dict[str, Any]]:
    from comol import kernels

    n = cfg.kernel_tokens
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    z = torch.randn(n, r, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(num_experts, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    cores = (torch.randn(num_experts, r, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    grad = torch.randn(n, r, generator=gen).to(device, dtype)
    params = [weight, cores]
    impls = [
        name for name in kernels.core_mix_names() if name != "auto" and kernels.core_mix_available(name, z)
    ]

    def forward(impl: str) -> torch.Tensor:
        if impl == "stacked":  # route, then build each token's r x r core
            probs = torch.softmax((z @ weight.t()).float(), dim=-1).to(dtype)  # (N, E)
            return kernels.core_mix_stacked(z, probs, cores)
        return kernels.routed_core_mix(z, z, weight, cores, impl=impl)[0]

    def step(impl: str) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.backward(forward(impl), grad)
            for t in (z, *params):
                t.grad = None

        return run

    cases = {impl: step(impl) for impl in impls}
    times = interleaved_medians(cases, device, cfg.repeats, cfg.warmup)
    for impl in impls:
        with saved_tensor_bytes(exclude=params) as saved:
            out = forward(impl)
        del out
        rows.append(
            {
                "impl": impl,
                "tokens": n,
                "r": r,
                "E": num_experts,
                **times[impl],
                "saved_bytes": saved.bytes,
            }
        )
    return rows
