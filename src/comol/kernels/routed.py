"""Routed core mixing: router logits, float32 softmax and core mixing as one operation, behind a registry.

The operation, per token (``u`` is the router input: ``z`` for core-space routing, ``x`` for input
routing)::

    probs = softmax_f32(W_g u)                   # (..., E) float32
    m     = sum_e probs_e M_e z                  # (..., r)

Implementations are keyed by the same names as :func:`comol.kernels.core_mix`; a name without a routed
variant here (``"eager"``, ``"stacked"``) means "route, then call ``core_mix``", which is the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from comol.mixture import routing

RoutedCoreMixFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]

_ROUTED: dict[str, RoutedCoreMixFn] = {}


def register_routed_core_mix(name: str, fn: RoutedCoreMixFn) -> None:
    """Add the routed variant of core-mix implementation ``name`` (availability is the core-mix one)."""
    _ROUTED[name] = fn


def has_routed_core_mix(name: str) -> bool:
    """Whether resolved implementation ``name`` fuses routing into the core mixing."""
    return name in _ROUTED


def routed_core_mix(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed core mixing with implementation ``impl`` (a resolved name, see ``resolve_core_mix``).

    Args:
        z: ``(..., r)`` low-rank codes.
        router_input: ``(..., k)``, ``z`` itself or the layer input.
        router_weight: ``(E, k)``, the router's ``nn.Linear`` weight (no bias).
        cores: ``(E, r, r)``.
        impl: an implementation with a routed variant, or ``"eager"`` for the reference.

    Returns:
        ``mixed (..., r)`` in ``z``'s dtype and ``probs (..., E)`` float32.
    """
    if impl in _ROUTED:
        return _ROUTED[impl](z, router_input, router_weight, cores)
    return routed_core_mix_eager(z, router_input, router_weight, cores)


def routed_core_mix_eager(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the layer's own steps (``nn.Linear`` router, ``softmax_f32``, ``core_mix_eager``)."""
    from comol.kernels import core_mix_eager

    logits = torch.nn.functional.linear(router_input, router_weight)  # (..., E)
    probs = routing.softmax_f32(logits)  # (..., E) float32
    return core_mix_eager(z, probs.to(z.dtype), cores), probs
