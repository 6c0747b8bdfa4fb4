"""HydraLoRA: an asymmetric LoRA with one shared A and many B heads (Tian et al., 2024, arXiv 2404.19245).

One down projection ``A (r x d_in)`` shared by all experts, ``E`` heads ``B_e (d_out x r)`` and a router
``W_g (E x d_in)`` on the layer input. For every token::

    g = softmax(W_g x)                                   # (..., E), float32
    h = W x + (alpha / r) * sum_e g_e B_e A dropout(x)

Trainable parameters per layer: ``r d_in + E r d_out + E d_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

from comol.mixture import MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.experts import LoRAExpertsLayer
from comol.mixture.registration import ComolPeftType


@dataclass
class HydraLoRAConfig(RoutedMixtureConfig):
    """Configuration of a HydraLoRA adapter (``num_experts`` B heads over one shared A).

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.hydralora import HydraLoRAConfig
        >>> model = get_peft_model(base_model, HydraLoRAConfig(r=8, num_experts=8))  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.HYDRALORA


class HydraLoRALayer(LoRAExpertsLayer):
    """HydraLoRA layer: ``hydralora_A (r, d_in)``, ``hydralora_B (E, d_out, r)``, ``hydralora_router``."""

    prefix = "hydralora_"
    shared_A = True


class HydraLoRAModel(MixtureModel):
    """peft tuner for HydraLoRA (use through ``peft.get_peft_model(model, HydraLoRAConfig(...))``)."""

    prefix = "hydralora_"
    tuner_layer_cls = HydraLoRALayer


register_method("hydralora", HydraLoRAConfig, HydraLoRAModel)
