"""The reference implementation of CoMoL's core mixing, and the naive one benchmarks compare against.

Notation: ``r`` rank, ``E`` experts, ``k`` router input width (``r`` for core-space routing, ``d_in`` for
input routing); any leading dimensions ``...`` are accepted. ``cores[e]`` is laid out like a Linear weight
``[out, in]``.

Every fast path (:mod:`comol.kernels.fused`, :mod:`comol.kernels.triton_core_mix`) is tested against the
functions here.
"""

from __future__ import annotations

import torch

from comol.mixture import routing


def core_mix_eager(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Reference mixing: all experts' ``M_e z`` at once, then the gate-weighted sum.

    Args:
        z: ``(..., r)`` low-rank codes.
        gates: ``(..., E)`` expert weights, same dtype as ``z``.
        cores: ``(E, r, r)``.

    Returns:
        ``(..., r)``: ``(sum_e g_e M_e) z`` per token.
    """
    expert_out = torch.einsum("...i,eoi->...eo", z, cores)  # (..., E, r)
    return torch.einsum("...e,...eo->...o", gates, expert_out)  # (..., r)


def routed_core_mix_eager(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routed mixing: ``nn.Linear`` router, :func:`~comol.mixture.routing.softmax_f32`, mixing.

    Args:
        z: ``(..., r)`` low-rank codes.
        router_input: ``(..., k)``: ``z`` itself or the layer input ``x``.
        router_weight: ``(E, k)``.
        cores: ``(E, r, r)``.

    Returns:
        ``mixed (..., r)`` in ``z``'s dtype and ``probs (..., E)`` float32.
    """
    logits = torch.nn.functional.linear(router_input, router_weight)  # (..., E)
    probs = routing.softmax_f32(logits)  # (..., E) float32
    return core_mix_eager(z, probs.to(z.dtype), cores), probs


def core_mix_stacked(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """The naive formulation, for benchmarks only: build each token's merged ``r x r`` core, then apply it.

    Memory ``O(N r^2)`` for ``N`` tokens; mathematically identical to :func:`core_mix_eager`.
    """
    merged = torch.einsum("...e,eoi->...oi", gates, cores)  # (..., r, r): one matrix per token
    return torch.einsum("...oi,...i->...o", merged, z)
