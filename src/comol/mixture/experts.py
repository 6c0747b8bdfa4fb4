"""Mixtures of ``E`` LoRA experts: the expert parametrisations and fusions that comol's baselines share.

Notation as in :mod:`comol.mixture.layer` (``E`` experts of rank ``r``; ``g`` the gates ``(..., E)``).
Two parametrisations:

- **full pairs**: expert ``e`` is ``B_e A_e`` with ``A (E, r, d_in)`` and ``B (E, d_out, r)``;
- **shared A**: one ``A (r, d_in)`` and ``E`` heads ``B (E, d_out, r)`` (HydraLoRA).

Two fusions:

- **mix outputs** (token-level routing)::

      delta = sum_e g_e B_e A_e x

  computed as ``z = A x`` for all experts at once ``(..., E, r)``, scaled by the gates and contracted with
  ``B`` over ``(e, r)`` in one matrix product: the per-expert outputs ``(..., E, d_out)`` are never formed.
- **merge parameters** (one routing decision per example, SMEAR)::

      A* = sum_e g_e A_e,  B* = sum_e g_e B_e,  delta = B* A* x

:class:`LoRAExpertsLayer` puts these together with a router on ``x``; a method chooses the parametrisation,
the routing level and the fusion with three class attributes and says how router ``probs`` become
``gates`` (:meth:`LoRAExpertsLayer.select_gates`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from comol.mixture.config import RoutedMixtureConfig
from comol.mixture.init import init_lora_pair_
from comol.mixture.layer import MixtureLayer


# --------------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------------
def mix_expert_outputs(
    x: torch.Tensor, gates: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> torch.Tensor:
    """Gate-weighted sum of the outputs of ``E`` LoRA experts.

    Args:
        x: ``(..., d_in)``.
        gates: ``(..., E)``, or any shape that broadcasts to it (e.g. ``(..., 1, E)`` for one gate per
            example), same dtype as ``x``.
        lora_A: ``(E, r, d_in)`` per-expert down projections, or ``(r, d_in)`` shared by all experts.
        lora_B: ``(E, d_out, r)`` per-expert up projections.

    Returns:
        ``(..., d_out)``: ``sum_e g_e B_e A_e x`` (unscaled).
    """
    if lora_A.dim() == 2:
        z = torch.einsum("...i,ri->...r", x, lora_A).unsqueeze(
            -2
        )  # (..., 1, r): the same code for every expert
    else:
        z = torch.einsum("...i,eri->...er", x, lora_A)  # (..., E, r)
    weighted = z * gates.unsqueeze(-1)  # (..., E, r)
    return torch.einsum("...er,eor->...o", weighted, lora_B)  # one product over (e, r)


def merge_experts(gates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted average of expert parameters.

    Args:
        gates: ``(..., E)``.
        weights: ``(E, *shape)``, e.g. ``(E, r, d_in)``.

    Returns:
        ``(..., *shape)``: ``sum_e gates[..., e] * weights[e]``.
    """
    num_experts, shape = weights.shape[0], weights.shape[1:]
    merged = torch.einsum("...e,ef->...f", gates, weights.reshape(num_experts, -1))
    return merged.reshape(*gates.shape[:-1], *shape)


def apply_merged_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Apply one merged LoRA per example to all of its tokens.

    Args:
        x: ``(..., T, d_in)``.
        lora_A: ``(..., r, d_in)``, one per example (or ``(r, d_in)`` shared).
        lora_B: ``(..., d_out, r)``, one per example.

    Returns:
        ``(..., T, d_out)``: ``B* A* x`` (unscaled).
    """
    z = torch.einsum("...ti,...ri->...tr", x, lora_A)  # (..., T, r)
    return torch.einsum("...tr,...or->...to", z, lora_B)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token dimension, ignoring padding.

    Args:
        x: ``(..., T, d_in)``.
        mask: ``(..., T)`` bool, False for padding (left or right), or None to average all tokens.

    Returns:
        ``(..., d_in)``; an example without any real token gets zeros.
    """
    if mask is None:
        return x.mean(dim=-2)
    weight = mask.to(x.dtype).unsqueeze(-1)  # (..., T, 1)
    return (x * weight).sum(dim=-2) / weight.sum(dim=-2).clamp_min(1.0)


# --------------------------------------------------------------------------------------------------
# Layer
# --------------------------------------------------------------------------------------------------
class LoRAExpertsLayer(MixtureLayer):
    """A router on ``x`` over ``E`` LoRA experts. Base class of MoLoRA, HydraLoRA, MoLA, AdaMoLE and SMEAR.

    Per adapter: ``<prefix>A`` (``nn.Parameter (E, r, d_in)``, or ``(r, d_in)`` if :attr:`shared_A`),
    ``<prefix>B`` (``nn.Parameter (E, d_out, r)``) and ``<prefix>router`` (``nn.Linear(d_in, E, bias=False)``).
    Expert ``e``'s update is ``(alpha / r) B_e A_e x``.

    A method sets :attr:`prefix` and, where it differs from the default, :attr:`shared_A`,
    :attr:`routing_level` and :attr:`fusion`; it overrides :meth:`select_gates` to sparsify or reweight
    the router's probabilities, and :meth:`num_experts` to vary ``E`` by layer.
    """

    module_parts = ("router",)
    param_parts = ("A", "B")

    shared_A: ClassVar[bool] = False
    """True: one ``A`` shared by all experts, which differ only in ``B`` (HydraLoRA)."""
    routing_level: ClassVar[Literal["token", "instance"]] = "token"
    """``"token"``: route every token on its own ``x``; ``"instance"``: route each example on the
    padding-aware mean of its tokens (tokens along dim ``-2``)."""
    fusion: ClassVar[Literal["outputs", "parameters"]] = "outputs"
    """``"outputs"``: mix the experts' outputs; ``"parameters"``: merge ``A`` and ``B``, then apply once
    (only with instance-level routing, where it costs one LoRA per example)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.fusion == "parameters" and cls.routing_level != "instance":
            raise TypeError(f"{cls.__name__}: fusion='parameters' needs routing_level='instance'.")

    # --- what a method may override ------------------------------------------------------------------
    def num_experts(self, config: RoutedMixtureConfig) -> int:
        """``E`` for this layer (default: ``config.num_experts``)."""
        return config.num_experts

    # --- tensors -------------------------------------------------------------------------------------
    def create_adapter(self, adapter_name: str, config: RoutedMixtureConfig) -> None:
        r, num_experts = config.r, self.num_experts(config)
        a_shape = (r, self.in_features) if self.shared_A else (num_experts, r, self.in_features)
        self.part("A")[adapter_name] = nn.Parameter(torch.empty(a_shape))
        self.part("B")[adapter_name] = nn.Parameter(torch.empty(num_experts, self.out_features, r))
        self.part("router")[adapter_name] = nn.Linear(self.in_features, num_experts, bias=False)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: RoutedMixtureConfig) -> None:
        init_lora_pair_(
            self.part("A")[adapter_name], self.part("B")[adapter_name], zero_B=config.init_weights
        )
        self.part("router")[adapter_name].reset_parameters()

    # --- forward -------------------------------------------------------------------------------------
    def route(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Gates for input ``x (..., d_in)``, in the dtype of ``x``.

        Returns:
            ``(..., E)`` for token-level routing; ``(..., E)`` over the leading (example) dimensions of
            ``x (..., T, d_in)`` for instance-level routing.
        """
        mask = self.context.token_mask(x.shape[:-1])  # (...) or None
        if self.routing_level == "instance":
            x = masked_mean(x, mask)  # (..., d_in): one representation per example
            mask = None
        logits = self.part("router")[adapter_name](x)  # (..., E)
        return self.gates_from_logits(adapter_name, logits, x, mask=mask).to(x.dtype)

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: the routed mixture of experts, times ``alpha / r``."""
        lora_A, lora_B = self.part("A")[adapter_name], self.part("B")[adapter_name]
        gates = self.route(adapter_name, x)
        x = self.adapter_dropout[adapter_name](x)
        if self.fusion == "parameters":  # gates (..., E) per example; x (..., T, d_in)
            merged_A = lora_A if self.shared_A else merge_experts(gates, lora_A)  # (..., r, d_in)
            merged_B = merge_experts(gates, lora_B)  # (..., d_out, r)
            out = apply_merged_lora(x, merged_A, merged_B)
        else:
            if self.routing_level == "instance":
                gates = gates.unsqueeze(-2)  # (..., 1, E): the same gates for every token of an example
            out = mix_expert_outputs(x, gates, lora_A, lora_B)
        return out * self.scaling[adapter_name]

    # --- merging and export --------------------------------------------------------------------------
    def layer_num_experts(self, adapter_name: str) -> int:
        return self.part("B")[adapter_name].shape[0]  # MoLA varies E by layer

    def fixed_gate_lora(
        self, adapter_name: str, gates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A, lora_B = self.part("A")[adapter_name], self.part("B")[adapter_name]
        num_experts, d_out, r = lora_B.shape
        gates = self.check_fixed_gates(adapter_name, gates, num_experts).to(lora_B)
        scaling = self.scaling[adapter_name]
        if self.shared_A:
            return lora_A, merge_experts(gates, lora_B) * scaling
        if self.fusion == "parameters":
            return merge_experts(gates, lora_A), merge_experts(gates, lora_B) * scaling
        # sum_e g_e B_e A_e = [g_1 B_1 ... g_E B_E] [A_1; ...; A_E]: a LoRA of rank E r
        stacked_B = torch.einsum("e,eor->oer", gates, lora_B).reshape(d_out, num_experts * r)
        return lora_A.reshape(num_experts * r, -1), stacked_B * scaling
