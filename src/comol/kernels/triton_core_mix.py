"""The Triton routed core mix as ``torch.library`` custom operators (CUDA; the kernels: ``triton_kernels``).

Two operators, so that ``torch.compile`` traces through them without a graph break and CUDA graphs can
capture them (no host-device synchronisation, no Python state):

- ``comol::routed_core_mix_triton(z, router_input, router_weight, cores, deterministic)``
  ``-> (mixed, probs)``;
- ``comol::routed_core_mix_triton_backward(z, router_input, router_weight, cores, grad_m, deterministic)``
  ``-> (grad_z, grad_router_input, grad_router_weight, grad_cores)``, the first one's registered autograd.

Each has a fake (meta) implementation giving shapes and dtypes, checked by ``torch.library.opcheck`` in the
tests. The forward saves only its inputs; backward recomputes the probabilities.

Dtypes: ``z``'s dtype is the compute dtype (see ``triton_kernels``): under autocast ``z`` is bf16/fp16 while
peft's adapter weights (router, cores) stay fp32, and the kernels cast them on load, as autocast does for
the eager path. ``mixed`` has ``z``'s dtype, ``probs`` is float32, each gradient has its input's dtype.

Deterministic mode (no atomics, fixed reduction order): ``torch.use_deterministic_algorithms(True)`` or
``deterministic=True``. Reference: :func:`comol.kernels.eager.routed_core_mix_eager`.
"""

from __future__ import annotations

from typing import Any

import torch

from comol.kernels import triton_kernels

__all__ = ["routed_core_mix_triton", "triton_importable"]


def triton_importable() -> bool:
    """Whether the ``triton`` package could be imported."""
    return triton_kernels.triton is not None


def _flat(z: torch.Tensor, router_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = z.shape[-1]
    zf = z.reshape(-1, r).contiguous()  # (N, r)
    return zf, router_input.reshape(-1, router_input.shape[-1]).contiguous()  # (N, k)


@torch.library.custom_op("comol::routed_core_mix_triton", mutates_args=())
def _routed_op(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    zf, uf = _flat(z, router_input)
    mixed, probs = triton_kernels.forward(zf, uf, router_weight.contiguous(), cores.contiguous())
    lead = z.shape[:-1]
    return mixed.view(*lead, cores.shape[1]), probs.view(*lead, cores.shape[0])


@_routed_op.register_fake
def _routed_fake(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    lead = z.shape[:-1]
    return z.new_empty(*lead, cores.shape[1]), z.new_empty(*lead, cores.shape[0], dtype=torch.float32)


@torch.library.custom_op("comol::routed_core_mix_triton_backward", mutates_args=())
def _backward_op(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor,
    grad_m: torch.Tensor, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    zf, uf = _flat(z, router_input)
    grad_mf = grad_m.reshape(zf.shape).to(z.dtype).contiguous()  # (N, r)
    grad_z, grad_u, grad_w, grad_cores = triton_kernels.backward(
        zf, uf, router_weight.contiguous(), cores.contiguous(), grad_mf, deterministic
    )
    return grad_z.view_as(z), grad_u.view_as(router_input), grad_w, grad_cores


@_backward_op.register_fake
def _backward_fake(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor,
    grad_m: torch.Tensor, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return (
        torch.empty_like(z),
        torch.empty_like(router_input),
        torch.empty_like(router_weight),
        torch.empty_like(cores),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    z, router_input, router_weight, cores, deterministic = inputs
    ctx.save_for_backward(z, router_input, router_weight, cores)
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_m: torch.Tensor | None, _grad_probs: torch.Tensor | None) -> tuple[Any, ...]:
    z, router_input, router_weight, cores = ctx.saved_tensors
    if grad_m is None:
        grad_m = torch.zeros_like(z)
    grads = torch.ops.comol.routed_core_mix_triton_backward(
        z, router_input, router_weight, cores, grad_m, ctx.deterministic
    )
    # When router_input is z, autograd adds the router's part to grad_z itself.
    return (*grads, None)


_routed_op.register_autograd(_backward, setup_context=_setup_context)


def routed_core_mix_triton(
    z: torch.Tensor,
    router_input: torch.Tensor,
    router_weight: torch.Tensor,
    cores: torch.Tensor,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`comol.kernels.fused.routed_core_mix_fused` (same arguments and results).

    Args:
        z: ``(..., r)``; its dtype is the compute dtype.
        router_input: ``(..., k)``, ``z`` or the layer input.
        router_weight: ``(E, k)``.
        cores: ``(E, r, r)``.
        deterministic: reduce the core gradient without atomics, in a fixed order; ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``mixed (..., r)`` in ``z``'s dtype and ``probs (..., E)`` float32 (not differentiable).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return torch.ops.comol.routed_core_mix_triton(z, router_input, router_weight, cores, deterministic)
