"""MoLA: mixture of LoRA experts with top-k routing and layer-wise expert counts (Gao et al., 2024,
"Higher Layers Need More LoRA Experts", arXiv 2402.08562).

``E_l`` full LoRA experts in layer ``l`` and a router ``W_g (E_l x d_in)``. For every token::

    p = softmax(W_g x)                                   # (..., E_l), float32
    g = top-k(p), renormalised to sum to 1               # exactly k non-zero gates (default k = 2)
    h = W x + (alpha / r) * sum_e g_e B_e A_e dropout(x)

``experts_per_layer`` gives ``E_l`` per contiguous group of layers: ``[2, 4, 6, 8]`` splits the model into
quarters (MoLA's "2468"); ``None`` uses ``num_experts`` everywhere (MoLA-uniform, the CoMoL paper's
setting). A layer's index is the first integer in its module name (``model.layers.3.self_attn.q_proj``
is layer 3); the number of layers is read from the model's config (``num_hidden_layers``).

Trainable parameters per layer: ``E_l (r (d_in + d_out) + d_in)``. Qwen3-8B, targets q, k, v, o, down,
r = 8: uniform 8 experts gives 107.35M (CoMoL paper, Table 2); ``[2, 4, 6, 8]`` gives 67.09M.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from comol.mixture import MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.experts import LoRAExpertsLayer
from comol.mixture.registration import ComolPeftType

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class MoLAConfig(RoutedMixtureConfig):
    """Configuration of a MoLA adapter.

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.mola import MoLAConfig
        >>> model = get_peft_model(base_model, MoLAConfig(r=8, experts_per_layer=[2, 4, 6, 8]))  # doctest: +SKIP
    """

    router_top_k: int | None = field(
        default=2, metadata={"help": "Experts activated per token (MoLA: 2); gates renormalised over them."}
    )
    experts_per_layer: list[int] | None = field(
        default=None,
        metadata={
            "help": "Experts per contiguous group of layers, e.g. [2, 4, 6, 8] for the four quarters of the model "
            "(one entry per layer also works). None: num_experts in every layer. When given, num_experts is set to "
            "its maximum."
        },
    )
    num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Number of layers the groups of experts_per_layer split. None: read from the model's config "
            "(num_hidden_layers) when the adapter is created, then saved."
        },
    )

    def __post_init__(self) -> None:
        if self.experts_per_layer is not None:
            self.experts_per_layer = list(self.experts_per_layer)
            if not self.experts_per_layer or any(
                not isinstance(e, int) or e < 1 for e in self.experts_per_layer
            ):
                raise ValueError(
                    f"experts_per_layer must be a non-empty list of integers >= 1, got {self.experts_per_layer!r}."
                )
            self.num_experts = max(self.experts_per_layer)
        super().__post_init__()
        self.peft_type = ComolPeftType.MOLA
        smallest = None if self.experts_per_layer is None else min(self.experts_per_layer)
        if self.router_top_k is not None and smallest is not None and self.router_top_k > smallest:
            raise ValueError(
                f"router_top_k={self.router_top_k} exceeds the smallest layer's experts ({smallest}) in "
                f"experts_per_layer={self.experts_per_layer}."
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers!r}.")

    def experts_for_layer(self, layer_index: int) -> int:
        """``E_l`` for layer ``layer_index`` (0-based)."""
        if self.experts_per_layer is None:
            return self.num_experts
        if self.num_layers is None:
            raise ValueError(
                "MoLAConfig.num_layers is unknown; set it or use a model whose config has num_hidden_layers."
            )
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer index {layer_index} is outside the model's {self.num_layers} layers.")
        groups = len(self.experts_per_layer)
        return self.experts_per_layer[layer_index * groups // self.num_layers]


class MoLALayer(LoRAExpertsLayer):
    """MoLA layer: ``mola_A (E_l, r, d_in)``, ``mola_B (E_l, d_out, r)``, ``mola_router``; top-k gates."""

    prefix = "mola_"

    def num_experts(self, config: MoLAConfig) -> int:
        if config.experts_per_layer is None:
            return config.num_experts
        match = _LAYER_INDEX.search(self.module_key or "")
        if match is None:
            raise ValueError(
                f"MoLA cannot tell which layer {self.module_key!r} belongs to (no integer in its name), so "
                "experts_per_layer cannot be applied; use experts_per_layer=None."
            )
        return config.experts_for_layer(int(match.group(1)))


class MoLAModel(MixtureModel):
    """peft tuner for MoLA (use through ``peft.get_peft_model(model, MoLAConfig(...))``)."""

    prefix = "mola_"
    tuner_layer_cls = MoLALayer

    def _prepare_adapter_config(self, peft_config: MoLAConfig, model_config: dict[str, Any]) -> MoLAConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.experts_per_layer is not None and peft_config.num_layers is None:
            text_config = model_config.get("text_config") or {}
            num_layers = model_config.get("num_hidden_layers") or text_config.get("num_hidden_layers")
            if num_layers is None:
                raise ValueError(
                    "MoLA could not read num_hidden_layers from the model's config; set num_layers."
                )
            peft_config.num_layers = int(num_layers)
        return peft_config


register_method("mola", MoLAConfig, MoLAModel)
