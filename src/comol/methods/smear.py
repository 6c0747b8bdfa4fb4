"""SMEAR: soft merging of experts with adaptive routing (Muqeeth et al., 2024, arXiv 2306.03745), with
LoRA experts as in the CoMoL paper (Eq. 6-8).

``E`` full LoRA experts ``A_e``, ``B_e`` and a router ``W_g (E x d_in)``. One routing decision per
example, from the mean of its tokens' inputs; the experts' parameters are merged with those gates and the
merged LoRA is applied to every token of the example::

    x_hat = sum_t m_t x_t / sum_t m_t                     # (B, d_in), m the attention mask
    g = softmax(W_g x_hat)                               # (B, E), float32
    A* = sum_e g_e A_e,  B* = sum_e g_e B_e               # (B, r, d_in), (B, d_out, r)
    h_t = W x_t + (alpha / r) * B* A* dropout(x_t)

Padding: the mean uses the ``attention_mask`` the model was called with (left or right padding alike);
without one (or when it does not match the layer's tokens) all tokens count. Tokens are taken along
dimension ``-2``: an input ``(T, d_in)`` is one example.

Cached generation: each decoding step feeds only the new token, so after the prompt the routing is made
from that one token (the merged expert can change from step to step); the prompt itself is routed on the
mean of all its tokens. Trainable parameters per layer: ``E r (d_in + d_out) + E d_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

from comol.mixture import MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.experts import LoRAExpertsLayer
from comol.mixture.registration import ComolPeftType


@dataclass
class SMEARConfig(RoutedMixtureConfig):
    """Configuration of a SMEAR adapter (``router_top_k`` would merge only the k best experts).

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.smear import SMEARConfig
        >>> model = get_peft_model(base_model, SMEARConfig(r=8, num_experts=8))  # doctest: +SKIP
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.SMEAR


class SMEARLayer(LoRAExpertsLayer):
    """SMEAR layer: ``smear_A (E, r, d_in)``, ``smear_B (E, d_out, r)``, ``smear_router``."""

    prefix = "smear_"
    routing_level = "instance"
    fusion = "parameters"


class SMEARModel(MixtureModel):
    """peft tuner for SMEAR (use through ``peft.get_peft_model(model, SMEARConfig(...))``)."""

    prefix = "smear_"
    tuner_layer_cls = SMEARLayer


register_method("smear", SMEARConfig, SMEARModel)
