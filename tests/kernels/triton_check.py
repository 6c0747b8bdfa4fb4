"""The Triton-vs-eager comparison, shared by the interpreted (subprocess) and CUDA tests."""

from __future__ import annotations

import torch

from comol.kernels.eager import routed_core_mix_eager
from comol.kernels.triton_core_mix import routed_core_mix_triton


def check(
    device: str, dtype: torch.dtype, n: int, r: int, num_experts: int, k: int, core_router: bool, tol: float
) -> None:
    """Outputs, probs and gradients of the Triton kernel equal the eager reference within ``tol``."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(device, dtype).requires_grad_()

    z, x, cores = t(n, r), t(n, k), t(num_experts, r, r)
    w = t(num_experts, r if core_router else k)
    u = z if core_router else x
    inputs = [z, w, cores] + ([] if core_router else [x])
    grad = torch.randn(n, r, generator=gen).to(device, dtype)
    results = []
    for fn in (routed_core_mix_eager, routed_core_mix_triton):
        mixed, probs = fn(z, u, w, cores)
        results.append((mixed, probs, torch.autograd.grad(mixed, inputs, grad)))
    (m0, p0, g0), (m1, p1, g1) = results
    torch.testing.assert_close(m1, m0, atol=tol, rtol=tol)
    torch.testing.assert_close(p1, p0, atol=tol, rtol=tol)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=4 * tol, rtol=4 * tol)
