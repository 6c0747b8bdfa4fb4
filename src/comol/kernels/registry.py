"""The registry of CoMoL core-mixing implementations: one name, one :class:`CoreMixImplementation`.

As transformers maps attention/MoE implementation names to forward functions, comol maps a name
(``"eager"``, ``"fused"``, ``"triton"``, ``"stacked"``) to the functions that compute CoMoL's mixture. ``"eager"``
(:mod:`comol.kernels.eager`) is the reference every other implementation is tested against; ``"auto"`` picks
the available implementation with the highest priority for the tensors' device.

An implementation provides

- ``core_mix(z, gates, cores) -> mixed``: the mixture with precomputed gates (top-k routing, or when
  the probabilities' graph is needed for a balancing loss);
- optionally ``routed(z, router_input, router_weight, cores) -> (mixed, probs)``: router logits, float32
  softmax and mixing as one operation. Without it, routing is done eagerly and ``core_mix`` mixes;
- optionally ``branch(x, lora_A, router_weight, cores, lora_B, scaling, core_router, router_x=None) ->
  (delta, probs)``: CoMoL's whole adapter branch ``s B (sum_e g_e M_e) A x`` as one operation (see
  :func:`comol.kernels.fused.comol_branch_fused`). Without it, the layer calls ``A``, ``routed``, ``B``;
- optionally ``prepare_inference(lora_A, router_weight, cores, lora_B, scaling, core_router) -> weights`` and
  ``branch_inference(x, weights, router_x=None) -> (delta, probs)``: the branch without autograd from weights
  laid out once (:func:`comol.kernels.fused.prepare_inference`), which the layer keeps between decoding steps.

Shapes: ``z (..., r)``, ``gates (..., E)``, ``cores (E, r, r)`` (``cores[e]`` laid out ``[out, in]``),
``router_input (..., k)``, ``router_weight (E, k)``; ``mixed (..., r)``, ``probs (..., E)`` float32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from comol.kernels.eager import core_mix_eager, core_mix_stacked
from comol.kernels.fused import (
    branch_inference,
    comol_branch_fused,
    core_mix_fused,
    prepare_inference,
    routed_core_mix_fused,
)
from comol.mixture import routing

CoreMixFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RoutedCoreMixFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
BranchFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
PrepareFn = Callable[..., Any]


def _everywhere(z: torch.Tensor) -> bool:
    return True


@dataclass(frozen=True)
class CoreMixImplementation:
    """One way of computing CoMoL's core mixing.

    Attributes:
        name: the registered name.
        core_mix: ``(z, gates, cores) -> mixed``.
        routed: ``(z, router_input, router_weight, cores) -> (mixed, probs)``, or None to route eagerly.
        branch: the whole adapter branch ``x -> (delta, probs)``, or None.
        prepare_inference: the weights ``branch_inference`` reads, laid out once, or None.
        branch_inference: ``(x, prepared, router_x) -> (delta, probs)`` without autograd, or None.
        available: ``available(z)``: whether it can run on ``z``'s device and dtype.
        priority: ``"auto"`` takes the available implementation with the highest priority.
    """

    name: str
    core_mix: CoreMixFn
    routed: RoutedCoreMixFn | None = None
    branch: BranchFn | None = None
    available: Callable[[torch.Tensor], bool] = _everywhere
    priority: int = 0
    prepare_inference: PrepareFn | None = None
    branch_inference: BranchFn | None = None

    def routed_core_mix(
        self, z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed variant, or eager routing followed by :attr:`core_mix` where there is none."""
        if self.routed is not None:
            return self.routed(z, router_input, router_weight, cores)
        probs = routing.softmax_f32(torch.nn.functional.linear(router_input, router_weight))  # (..., E)
        return self.core_mix(z, probs.to(z.dtype), cores), probs


_REGISTRY: dict[str, CoreMixImplementation] = {}


def register_core_mix(
    name: str,
    core_mix: CoreMixFn,
    routed: RoutedCoreMixFn | None = None,
    branch: BranchFn | None = None,
    available: Callable[[torch.Tensor], bool] | None = None,
    priority: int = 0,
    prepare_inference: PrepareFn | None = None,
    branch_inference: BranchFn | None = None,
) -> None:
    """Add (or replace) implementation ``name``; see :class:`CoreMixImplementation` for the arguments."""
    if name == "auto":
        raise ValueError("'auto' is reserved: it means the best available implementation.")
    if (prepare_inference is None) != (branch_inference is None):
        raise ValueError("prepare_inference and branch_inference are registered together.")
    _REGISTRY[name] = CoreMixImplementation(
        name,
        core_mix,
        routed,
        branch,
        available or _everywhere,
        priority,
        prepare_inference,
        branch_inference,
    )


def core_mix_names() -> list[str]:
    """Registered implementation names, plus ``"auto"``."""
    return ["auto", *sorted(_REGISTRY)]


def core_mix_available(name: str, z: torch.Tensor) -> bool:
    """Whether registered implementation ``name`` can run on ``z``."""
    return name in _REGISTRY and _REGISTRY[name].available(z)


def check_core_mix_name(name: str) -> None:
    """Raise ``ValueError`` if ``name`` is neither ``"auto"`` nor a registered implementation."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"Unknown core-mix implementation {name!r}; choose one of {core_mix_names()}.")


def get_core_mix(name: str, z: torch.Tensor) -> CoreMixImplementation:
    """The implementation that ``name`` means for input ``z`` (resolves ``"auto"``)."""
    if name == "auto":  # a plain loop, so that torch.compile traces the resolution without a graph break
        best = _REGISTRY["eager"]
        for impl in _REGISTRY.values():
            if impl.priority > best.priority and impl.available(z):
                best = impl
        return best
    check_core_mix_name(name)
    impl = _REGISTRY[name]
    if not impl.available(z):
        raise ValueError(
            f"Core-mix implementation {name!r} cannot run on {z.device.type} tensors of dtype {z.dtype}; "
            "use 'auto' or 'eager'."
        )
    return impl


def resolve_core_mix(name: str, z: torch.Tensor) -> str:
    """The name of the implementation that ``name`` means for input ``z`` (resolves ``"auto"``)."""
    return get_core_mix(name, z).name


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
    return get_core_mix(impl, z).core_mix(z, gates, cores)


def routed_core_mix(
    z: torch.Tensor,
    router_input: torch.Tensor,
    router_weight: torch.Tensor,
    cores: torch.Tensor,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits, float32 softmax and core mixing with implementation ``impl``.

    Args:
        z: ``(..., r)`` low-rank codes.
        router_input: ``(..., k)``, ``z`` itself or the layer input.
        router_weight: ``(E, k)``, the router's ``nn.Linear`` weight (no bias).
        cores: ``(E, r, r)``.
        impl: registered implementation name or ``"auto"``.

    Returns:
        ``mixed (..., r)`` in ``z``'s dtype and ``probs (..., E)`` float32.
    """
    return get_core_mix(impl, z).routed_core_mix(z, router_input, router_weight, cores)


register_core_mix("eager", core_mix_eager, priority=0)
register_core_mix("stacked", core_mix_stacked, priority=-10)  # benchmarks only: never chosen by "auto"
register_core_mix(
    "fused",
    core_mix_fused,
    routed=routed_core_mix_fused,
    branch=comol_branch_fused,
    priority=10,
    prepare_inference=prepare_inference,
    branch_inference=branch_inference,
)


# --- Triton (CUDA) --------------------------------------------------------------------------------------
# The kernels live in comol.kernels.triton_core_mix and are imported on first use only (availability is
# decided without importing them, so that torch.compile can trace it). Given precomputed gates, the Triton
# implementation uses the fused PyTorch mixing.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_available(z: torch.Tensor) -> bool:
    return z.is_cuda and _TRITON_INSTALLED


def _routed_core_mix_triton(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from comol.kernels.triton_core_mix import routed_core_mix_triton

    return routed_core_mix_triton(z, router_input, router_weight, cores)


register_core_mix(
    "triton", core_mix_fused, routed=_routed_core_mix_triton, available=_triton_available, priority=20
)
# --- end Triton -------------------------------------------------------------------------------------------
