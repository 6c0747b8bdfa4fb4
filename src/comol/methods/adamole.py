"""AdaMoLE: adaptive mixture of LoRA experts with a learned activation threshold (Liu and Luo, 2024,
arXiv 2405.00361).

``E`` full LoRA experts, a router ``W_g (E x d_in)`` and a threshold network ``w_tau (d_in)``, ``b_tau``.
For every token, the experts whose router probability reaches a token-dependent threshold are
activated, weighted by how far they exceed it::

    p = softmax(W_g x)                                   # (..., E), float32
    tau = tau_max * sigmoid(w_tau . x + b_tau)           # (..., 1), tau_max = 1 / E by default
    g_e = (p_e - tau) [p_e >= tau] / sum_j (p_j - tau) [p_j >= tau]
    h = W x + (alpha / r) * sum_e g_e B_e A_e dropout(x)

With ``tau_max <= 1 / E`` the largest probability (at least ``1 / E``) always passes, so every token uses
at least one expert; how many it uses varies per token. Subtracting ``tau`` makes the gates, and so the
loss, depend on the threshold network, which is how it is trained. Trainable parameters per layer:
``E r (d_in + d_out) + E d_in + d_in + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comol.mixture import MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.experts import LoRAExpertsLayer
from comol.mixture.registration import ComolPeftType


@dataclass
class AdaMoLEConfig(RoutedMixtureConfig):
    """Configuration of an AdaMoLE adapter.

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.adamole import AdaMoLEConfig
        >>> model = get_peft_model(base_model, AdaMoLEConfig(r=8, num_experts=8))  # doctest: +SKIP
    """

    max_threshold: float | None = field(
        default=None,
        metadata={
            "help": "tau_max, the largest threshold the threshold network can output. None: 1 / num_experts, which "
            "guarantees at least one active expert per token (larger values may leave a token without any)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.ADAMOLE
        if self.router_top_k is not None:
            raise ValueError(
                "AdaMoLE picks the experts of each token with its threshold network; leave router_top_k=None."
            )
        if self.max_threshold is not None and not 0 < self.max_threshold <= 1:
            raise ValueError(f"max_threshold must be in (0, 1], got {self.max_threshold!r}.")


class AdaMoLELayer(LoRAExpertsLayer):
    """AdaMoLE layer: ``adamole_A (E, r, d_in)``, ``adamole_B (E, d_out, r)``, ``adamole_router`` and
    ``adamole_threshold`` (``nn.Linear(d_in, 1)`` with bias)."""

    prefix = "adamole_"
    module_parts = ("router", "threshold")

    def create_adapter(self, adapter_name: str, config: AdaMoLEConfig) -> None:
        super().create_adapter(adapter_name, config)
        self.adamole_threshold[adapter_name] = nn.Linear(self.in_features, 1)

    def reset_adapter(self, adapter_name: str, config: AdaMoLEConfig) -> None:
        super().reset_adapter(adapter_name, config)
        self.adamole_threshold[adapter_name].reset_parameters()

    def select_gates(self, adapter_name: str, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Threshold gates ``(..., E)`` float32 from ``probs (..., E)`` and ``x (..., d_in)``."""
        max_threshold = self.adapter_config[adapter_name].max_threshold or 1.0 / probs.shape[-1]
        logits = self.adamole_threshold[adapter_name](x).to(probs.dtype)  # (..., 1), float32 (or float64)
        threshold = max_threshold * torch.sigmoid(logits)  # (..., 1)
        excess = (probs - threshold).clamp_min(0.0)  # (..., E): zero for experts below the threshold
        return excess / excess.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(excess.dtype).tiny)


class AdaMoLEModel(MixtureModel):
    """peft tuner for AdaMoLE (use through ``peft.get_peft_model(model, AdaMoLEConfig(...))``)."""

    prefix = "adamole_"
    tuner_layer_cls = AdaMoLELayer


register_method("adamole", AdaMoLEConfig, AdaMoLEModel)
