"""MoLoRA: mixture of LoRA experts with token-level soft routing (Zadouri et al., 2023, arXiv 2309.05444).

``E`` full LoRA experts ``A_e (r x d_in)``, ``B_e (d_out x r)`` and a router ``W_g (E x d_in)`` on the
layer input. For every token::

    g = softmax(W_g x)                                   # (..., E), float32
    h = W x + (alpha / r) * sum_e g_e B_e A_e dropout(x)

Outputs are mixed with :func:`comol.mixture.experts.mix_expert_outputs`. Trainable parameters per layer:
``E r (d_in + d_out) + E d_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

from comol.mixture import MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.experts import LoRAExpertsLayer
from comol.mixture.registration import ComolPeftType


@dataclass
class MoLoRAConfig(RoutedMixtureConfig):
    """Configuration of a MoLoRA adapter (soft routing by default; ``router_top_k`` sparsifies it).

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.molora import MoLoRAConfig
        >>> model = get_peft_model(base_model, MoLoRAConfig(r=8, num_experts=8))  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.MOLORA


class MoLoRALayer(LoRAExpertsLayer):
    """MoLoRA layer: ``molora_A (E, r, d_in)``, ``molora_B (E, d_out, r)``, ``molora_router``."""

    prefix = "molora_"


class MoLoRAModel(MixtureModel):
    """peft tuner for MoLoRA (use through ``peft.get_peft_model(model, MoLoRAConfig(...))``)."""

    prefix = "molora_"
    tuner_layer_cls = MoLoRALayer


register_method("molora", MoLoRAConfig, MoLoRAModel)
