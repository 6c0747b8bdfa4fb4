"""The Triton-vs-eager comparisons, shared by the interpreted (subprocess) and CUDA tests."""

from __future__ import annotations

import contextlib

import torch

from comol.kernels.eager import routed_core_mix_eager
from comol.kernels.triton_core_mix import routed_core_mix_triton


def _inputs(device, n, r, num_experts, k, core_router, act_dtype, weight_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(dtype, *shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(device, dtype).requires_grad_()

    z, x = t(act_dtype, n, r), t(weight_dtype if not core_router else act_dtype, n, k)
    cores, w = t(weight_dtype, num_experts, r, r), t(weight_dtype, num_experts, r if core_router else k)
    grad = torch.randn(n, r, generator=gen).to(device, act_dtype)
    return z, x, w, cores, grad


def run(fn, z, x, w, cores, grad, core_router, **kwargs):
    """``mixed``, ``probs`` and the gradients w.r.t. ``z, w, cores`` (and ``x`` for input routing)."""
    u = z if core_router else x
    inputs = [z, w, cores] + ([] if core_router else [x])
    mixed, probs = fn(z, u, w, cores, **kwargs)
    return mixed, probs, torch.autograd.grad(mixed, inputs, grad)


def check(
    device: str,
    dtype: torch.dtype,
    n: int,
    r: int,
    num_experts: int,
    k: int,
    core_router: bool,
    tol: float,
    weight_dtype: torch.dtype | None = None,
    deterministic: bool = False,
) -> None:
    """Outputs, probs and gradients of the Triton op equal the eager reference within ``tol``, with the
    same dtypes. ``weight_dtype`` (router weight, cores, an input-routing ``x``) differing from ``dtype``
    (``z``) is the autocast case, and the eager reference then runs under ``torch.autocast``."""
    weight_dtype = weight_dtype or dtype
    z, x, w, cores, grad = _inputs(device, n, r, num_experts, k, core_router, dtype, weight_dtype)
    mixed_precision = weight_dtype != dtype
    autocast = torch.autocast(device, dtype=dtype) if mixed_precision else contextlib.nullcontext()
    with autocast:
        m0, p0, g0 = run(routed_core_mix_eager, z, x, w, cores, grad, core_router)
        m1, p1, g1 = run(
            routed_core_mix_triton, z, x, w, cores, grad, core_router, deterministic=deterministic
        )
    assert (m1.dtype, p1.dtype) == (m0.dtype, p0.dtype), (m1.dtype, p1.dtype, m0.dtype, p0.dtype)
    torch.testing.assert_close(m1, m0, atol=tol, rtol=tol)
    torch.testing.assert_close(p1, p0, atol=tol, rtol=tol)
    for a, b in zip(g1, g0, strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        torch.testing.assert_close(a, b, atol=4 * tol, rtol=4 * tol)


def check_deterministic(device: str, n: int, r: int, num_experts: int, k: int, core_router: bool) -> None:
    """Deterministic mode: two runs give bitwise equal outputs and gradients."""
    results = []
    for _ in range(2):
        z, x, w, cores, grad = _inputs(
            device, n, r, num_experts, k, core_router, torch.float32, torch.float32
        )
        results.append(run(routed_core_mix_triton, z, x, w, cores, grad, core_router, deterministic=True))
    (m0, p0, g0), (m1, p1, g1) = results
    for a, b in zip((m0, p0, *g0), (m1, p1, *g1), strict=True):
        assert torch.equal(a, b)


def opcheck(device: str) -> None:
    """``torch.library.opcheck`` (schema, fake implementation, autograd registration, AOT dispatch)."""
    from comol.kernels import triton_core_mix  # noqa: F401 - registers the ops

    for core_router in (True, False):
        z, x, w, cores, grad = _inputs(device, 20, 4, 3, 24, core_router, torch.float32, torch.float32)
        u = z if core_router else x
        for deterministic in (False, True):
            torch.library.opcheck(torch.ops.comol.routed_core_mix_triton, (z, u, w, cores, deterministic))
            args = (z.detach(), u.detach(), w.detach(), cores.detach(), grad, deterministic)
            torch.library.opcheck(torch.ops.comol.routed_core_mix_triton_backward, args)


def compile_fullgraph(device: str) -> None:
    """``torch.compile(fullgraph=True)`` traces through the op, ``z`` passed twice (core-space routing)
    included, and gives the eager op's values and gradients."""
    z, _, w, cores, grad = _inputs(device, 20, 4, 3, 4, True, torch.float32, torch.float32)

    def step(z, w, cores):
        mixed, probs = routed_core_mix_triton(z, z, w, cores)
        return (mixed * grad).sum() + probs.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(step(z, w, cores), (z, w, cores))
    compiled_grads = torch.autograd.grad(compiled(z, w, cores), (z, w, cores))
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
