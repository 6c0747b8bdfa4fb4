"""Implementations of CoMoL's core mixing, behind a small registry.

The operation: for each token, mix the expert cores with the token's gates and apply the result to the
token's low-rank code, without ever forming a per-token ``r x r`` matrix::

    m[..., o] = sum_e gates[..., e] * sum_i cores[e, o, i] * z[..., i]

Shapes: ``z (..., r)``, ``gates (..., E)``, ``cores (E, r, r)`` with ``cores[e]`` laid out like a Linear
weight ``[out, in]``; result ``(..., r)``.

``"eager"`` is the reference every other implementation is tested against. ``"auto"`` picks the fastest
implementation available for the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "core_mix",
    "core_mix_available",
    "core_mix_eager",
    "core_mix_fused",
    "core_mix_names",
    "core_mix_stacked",
    "has_routed_core_mix",
    "register_core_mix",
    "register_routed_core_mix",
    "resolve_core_mix",
    "routed_core_mix",
    "routed_core_mix_eager",
    "routed_core_mix_fused",
]

CoreMixFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Impl:
    fn: CoreMixFn
    available: Callable[[torch.Tensor], bool]
    priority: int  # "auto" takes the available implementation with the highest priority


_REGISTRY: dict[str, _Impl] = {}


def register_core_mix(
    name: str, fn: CoreMixFn, available: Callable[[torch.Tensor], bool] | None = None, priority: int = 0
) -> None:
    """Add an implementation. ``available(z)`` says whether it can run on ``z``'s device and dtype."""
    _REGISTRY[name] = _Impl(fn, available or (lambda z: True), priority)


def core_mix_names() -> list[str]:
    """Registered implementation names, plus ``"auto"``."""
    return ["auto", *sorted(_REGISTRY)]


def core_mix_available(name: str, z: torch.Tensor) -> bool:
    """Whether registered implementation ``name`` can run on ``z``."""
    return name in _REGISTRY and _REGISTRY[name].available(z)


def resolve_core_mix(name: str, z: torch.Tensor) -> str:
    """The implementation that ``name`` means for input ``z`` (resolves ``"auto"``)."""
    if name == "auto":
        candidates = [(impl.priority, n) for n, impl in _REGISTRY.items() if impl.available(z)]
        return max(candidates)[1]
    if name not in _REGISTRY:
        raise ValueError(f"Unknown core-mix implementation {name!r}; choose one of {core_mix_names()}.")
    if not _REGISTRY[name].available(z):
        raise ValueError(
            f"Core-mix implementation {name!r} cannot run on {z.device.type} tensors of dtype {z.dtype}; "
            "use 'auto' or 'eager'."
        )
    return name


def core_mix(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Apply the gate-weighted mixture of cores to ``z``.

    Args:
        z: ``(..., r)`` low-rank codes ``A x``.
        gates: ``(..., E)`` expert weights, same dtype as ``z``.
        cores: ``(E, r, r)`` expert cores ``M_e[out, in]``.
        impl: registered implementation name or ``"auto"``.

    Returns:
        ``(..., r)``: ``(sum_e gates_e M_e) z`` per token.
    """
    return _REGISTRY[resolve_core_mix(impl, z)].fn(z, gates, cores)


def core_mix_eager(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Reference implementation: all experts' ``M_e z`` at once, then the gate-weighted sum."""
    expert_out = torch.einsum("...i,eoi->...eo", z, cores)  # (..., E, r)
    return torch.einsum("...e,...eo->...o", gates, expert_out)  # (..., r)


def core_mix_stacked(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """The naive formulation, for benchmarks only: build each token's merged ``r x r`` core, then apply it.

    Memory ``O(N r^2)`` for ``N`` tokens; mathematically identical to :func:`core_mix_eager`.
    """
    merged = torch.einsum("...e,eoi->...oi", gates, cores)  # (..., r, r): one matrix per token
    return torch.einsum("...oi,...i->...o", merged, z)


register_core_mix("eager", core_mix_eager, priority=0)


def _triton_available(z: torch.Tensor) -> bool:
    if not z.is_cuda:
        return False
    from comol.kernels import triton_core_mix  # imports triton, once

    return triton_core_mix.triton_importable()


def _routed_core_mix_triton(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from comol.kernels.triton_core_mix import routed_core_mix_triton

    return routed_core_mix_triton(z, router_input, router_weight, cores)


# Imported after the registry exists; these modules depend on torch only (Triton is imported lazily).
from comol.kernels.fused import core_mix_fused, routed_core_mix_fused  # noqa: E402
from comol.kernels.routed import (  # noqa: E402
    has_routed_core_mix,
    register_routed_core_mix,
    routed_core_mix,
    routed_core_mix_eager,
)

register_core_mix("stacked", core_mix_stacked, priority=-10)  # benchmarks only: never chosen by "auto"
register_core_mix("fused", core_mix_fused, priority=10)
register_routed_core_mix("fused", routed_core_mix_fused)
# Triton fuses routing with mixing; given precomputed gates it uses the fused PyTorch function.
register_core_mix("triton", core_mix_fused, available=_triton_available, priority=20)
register_routed_core_mix("triton", _routed_core_mix_triton)
