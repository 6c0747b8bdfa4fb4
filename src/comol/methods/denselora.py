"""DenseLoRA: dense low-rank adaptation (Mu et al., 2025, arXiv 2505.23808).

Instead of a pair of low-rank matrices per layer, DenseLoRA compresses the input with an encoder shared by
all layers, adapts the compressed representation with a small dense matrix of its own per layer, and maps
it back with a decoder that is also shared::

    z = dropout(act(E_t dropout(x)))                  # (..., r), encoder E_t (r x d_in) shared by all layers
    h = W x + (alpha / r) * dropout(act(D_t (M z)))   # M (r x r) per adapted module, D_t (d_out x r) shared

``dropout`` is the adapter's dropout (``lora_dropout``), applied three times with independent masks, as in
the DenseLoRA authors' forward (``commonsense_reasoning/peft/src/peft/tuners/lora.py``:
``lora_dropout(nolinear(lora_decoder(lora_m(lora_dropout(nolinear(lora_encoder(lora_dropout(x))))))))
* scaling``).

``t`` is the kind of module (its name, e.g. ``q_proj``, together with its shape): every ``q_proj`` of the
model uses the same ``E``/``D``, every ``down_proj`` another pair. The shared pairs belong to the tuner
(like the projections of peft's VeRA) and are saved once; each layer only owns ``M``.

Trainable parameters: ``r (d_in + d_out)`` per module kind, plus ``r^2`` per adapted module.

Reading of details the CoMoL paper does not state: ``act`` is GELU on both the encoder and the decoder output
(as in the authors' code), ``E`` and ``M`` are Kaiming-uniform and ``D`` is zero at init, so the adapted
model starts as the base model. The authors' code shares by substring of the module name (``'q' in name``,
``'k'``, ``'v'``, ``'up'``, ``'down'``) and builds its encoder/decoder pairs for q, k, v, up and down
unconditionally (shapes hard-coded for Llama-3-8B), whatever the target modules; keying by name and shape
here gives the same sharing for the modules that are adapted and never creates unused pairs. Its
``mark_only_lora_as_trainable`` leaves every ``lora_``-named parameter trainable, so an unused pair is still
counted: with the CoMoL paper's setting (r = 256, q/k/v/o/down) we count 22.81M trainable parameters on
Qwen3-8B and 22.02M on Llama-3.1-8B; the paper's 27.00M and 26.74M are exactly these plus ``r (d + d_ff)``,
the size of one ``up`` pair (encoder ``r x d``, decoder ``d_ff x r``), most likely the reference code's
unused ``up`` pair counted as trainable (see ``comol.params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comol.mixture import MixtureConfig, MixtureLayer, MixtureModel, register_method
from comol.mixture.init import init_lora_pair_, kaiming_linear_
from comol.mixture.registration import ComolPeftType

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "identity": lambda t: t}


@dataclass
class DenseLoRAConfig(MixtureConfig):
    """Configuration of a DenseLoRA adapter.

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.denselora import DenseLoRAConfig
        >>> model = get_peft_model(base_model, DenseLoRAConfig(r=256, lora_alpha=256))  # doctest: +SKIP
    """

    activation: str = field(
        default="gelu",
        metadata={"help": f"Activation after the shared encoder and decoder: one of {sorted(ACTIVATIONS)}."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.DENSELORA
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}.")


class SharedProjections:
    """A view of the tuner's shared encoders/decoders, held by every layer without registering them as its
    submodules (so that they are stored, moved and saved once, by the tuner).

    Args:
        encoders: ``{adapter: {kind: E (r, d_in)}}`` (a ``ModuleDict`` of ``ParameterDict``).
        decoders: ``{adapter: {kind: D (d_out, r)}}``.

    The adapter name is the second-to-last part of each state-dict key
    (``base_model.denselora_encoder.<adapter>.<kind>``), so that peft strips and restores it like any other
    adapter tensor and an adapter can be loaded under another name.
    """

    def __init__(self, encoders: nn.ModuleDict, decoders: nn.ModuleDict) -> None:
        self.encoders = encoders
        self.decoders = decoders

    def get(self, adapter_name: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoders[adapter_name][kind], self.decoders[adapter_name][kind]


class DenseLoRALayer(MixtureLayer):
    """DenseLoRA layer. Per adapter: ``denselora_M (r, r)`` (an ``nn.Parameter``, ``M[out, in]``); the shared
    encoder and decoder of its module kind are looked up in :attr:`shared` (set by the tuner)."""

    prefix = "denselora_"
    param_parts = ("M",)

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.shared: SharedProjections | None = None
        self.kind: str | None = None

    def create_adapter(self, adapter_name: str, config: DenseLoRAConfig) -> None:
        self.denselora_M[adapter_name] = nn.Parameter(torch.empty(config.r, config.r))

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: DenseLoRAConfig) -> None:
        kaiming_linear_(self.denselora_M[adapter_name])

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: ``(alpha/r) dropout(act(D (M dropout(act(E dropout(x))))))``."""
        if self.shared is None or self.kind is None:
            raise RuntimeError(
                f"{self.module_key}: DenseLoRA layer used outside its tuner (no shared projections)."
            )
        act = ACTIVATIONS[self.adapter_config[adapter_name].activation]
        encoder, decoder = self.shared.get(adapter_name, self.kind)
        dropout = self.adapter_dropout[adapter_name]
        z = dropout(act(torch.einsum("...i,ri->...r", dropout(x), encoder)))  # (..., r)
        m = torch.einsum("...i,oi->...o", z, self.denselora_M[adapter_name])  # (..., r)
        out = dropout(act(torch.einsum("...r,or->...o", m, decoder)))  # (..., d_out)
        return out * self.scaling[adapter_name]

    def merge_blocker(self, adapter_name: str) -> str | None:
        return (
            f"adapter {adapter_name!r} applies a non-linear activation "
            f"({self.adapter_config[adapter_name].activation}) between its encoder and decoder, so its update is "
            "not a linear map of the input and cannot be folded into the base weights."
        )


def module_kind(module_key: str, in_features: int, out_features: int) -> str:
    """Sharing key of a module: its name in the layer and its shape, e.g. ``"q_proj_4096x4096"``."""
    return f"{module_key.rsplit('.', 1)[-1]}_{in_features}x{out_features}"


class DenseLoRAModel(MixtureModel):
    """peft tuner for DenseLoRA; owns the shared encoders ``denselora_encoder`` (``{adapter: {kind: E (r, d_in)}}``)
    and decoders ``denselora_decoder`` (``{adapter: {kind: D (d_out, r)}}``)."""

    prefix = "denselora_"
    tuner_layer_cls = DenseLoRALayer
    uses_shared_state = (
        True  # the shared encoders/decoders live on the tuner: peft refuses inject_adapter_in_model
    )

    def _create_and_replace(
        self,
        config: DenseLoRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if not hasattr(self, "denselora_encoder"):
            self.denselora_encoder = nn.ModuleDict()
            self.denselora_decoder = nn.ModuleDict()
            self._shared = SharedProjections(self.denselora_encoder, self.denselora_decoder)
        if adapter_name not in self.denselora_encoder:
            self.denselora_encoder[adapter_name] = nn.ParameterDict()
            self.denselora_decoder[adapter_name] = nn.ParameterDict()
        super()._create_and_replace(
            config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
        )
        layer: DenseLoRALayer = getattr(parent, target_name)
        layer.shared = self._shared
        layer.kind = module_kind(current_key, layer.in_features, layer.out_features)
        self._ensure_shared(adapter_name, config, layer)

    @torch.no_grad()
    def _ensure_shared(self, adapter_name: str, config: DenseLoRAConfig, layer: DenseLoRALayer) -> None:
        """Create (once per module kind) and initialise the shared encoder and decoder."""
        encoders, decoders = self.denselora_encoder[adapter_name], self.denselora_decoder[adapter_name]
        if layer.kind in encoders:
            return
        weight = layer.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        encoder = torch.empty(config.r, layer.in_features, device=weight.device, dtype=dtype)  # (r, d_in)
        decoder = torch.empty(layer.out_features, config.r, device=weight.device, dtype=dtype)  # (d_out, r)
        init_lora_pair_(encoder, decoder, zero_B=config.init_weights)  # as a LoRA pair
        encoders[layer.kind] = nn.Parameter(encoder, requires_grad=trainable)
        decoders[layer.kind] = nn.Parameter(decoder, requires_grad=trainable)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """As peft does for layer tensors: upcast float16/bfloat16 shared projections to float32."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype or not hasattr(self, "denselora_encoder"):
            return
        for container in (self.denselora_encoder, self.denselora_decoder):
            for param in container[adapter_name].values() if adapter_name in container else ():
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()

    def _set_shared_trainable(self, active: list[str], inference_mode: bool) -> None:
        for container in (self.denselora_encoder, self.denselora_decoder):
            for name, modules in container.items():
                modules.requires_grad_(name in active and not inference_mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_shared_trainable(
            [adapter_name] if isinstance(adapter_name, str) else adapter_name, inference_mode
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for container in (self.denselora_encoder, self.denselora_decoder):
            if adapter_name in container:
                del container[adapter_name]


register_method("denselora", DenseLoRAConfig, DenseLoRAModel)
