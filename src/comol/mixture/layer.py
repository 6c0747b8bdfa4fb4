"""The adapter layer every mixture-of-LoRA method builds on.

Notation (used in every docstring and ``einsum`` of comol):

=========  ===========================================================
``B``      batch size
``T``      tokens per sequence (any leading dimensions are accepted)
``N``      tokens in all, ``B * T`` once leading dimensions are flattened
``d_in``   input features of the frozen base layer ``W (d_out x d_in)``
``d_out``  output features of the base layer
``r``      LoRA rank
``E``      number of experts
=========  ===========================================================

A :class:`MixtureLayer` wraps a frozen ``nn.Linear`` (or transformers' ``Conv1D``, or a quantized linear
layer such as bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, which subclass ``nn.Linear``) and adds, for
every active adapter, ``h = W x + delta(x)``. A method subclasses it and says which per-adapter tensors it owns
(:attr:`MixtureLayer.module_parts` / :attr:`MixtureLayer.param_parts`), how to create and initialise them
(:meth:`create_adapter`, :meth:`reset_adapter`) and how to compute ``delta`` (:meth:`adapter_forward`).
Everything else is shared: peft's adapter bookkeeping (several named adapters, ``set_adapter``,
``disable_adapter``), input dtype casting, merging where a method allows it, router statistics hooks and
auxiliary losses.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from comol.mixture import routing
from comol.mixture.adapters import AdapterContainers
from comol.mixture.observe import RoutingContext

if TYPE_CHECKING:
    from comol.mixture.config import MixtureConfig

T = TypeVar("T")


def _never() -> bool:
    return False


# A tensor's version counter and storage address: what inference_weights keys its kept weights on.
_version_of = operator.attrgetter("_version")
_data_ptr_of = operator.methodcaller("data_ptr")

# Whether weights may be sharded and gathered into reused storage (``torch.distributed`` initialised).
_sharding_possible = torch.distributed.is_initialized if torch.distributed.is_available() else _never


class MergeNotSupportedError(ValueError):
    """Raised when an adapter's update depends on the input, so it cannot be folded into ``W``."""


def quantization_of(base: nn.Module) -> str | None:
    """What quantizes ``base``'s weight (e.g. ``"bitsandbytes Linear4bit (nf4)"``), or None for a float weight.

    The adapter never reads ``W`` itself (it only calls the base layer), so quantized bases need nothing else;
    only merging, which writes ``W``, does.
    """
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype.is_floating_point:
        return None
    quant_type = getattr(weight, "quant_type", None)  # bitsandbytes' Params4bit: "nf4" or "fp4"
    detail = f" ({quant_type})" if quant_type else ""
    return f"{type(base).__module__.split('.')[0]} {type(base).__name__}{detail} with {weight.dtype} storage"


class MixtureLayer(nn.Module, AdapterContainers):
    """Base class of all mixture-of-LoRA adapter layers.

    Subclasses set :attr:`prefix` (``"<method>_"``), :attr:`module_parts` and :attr:`param_parts`; the
    per-adapter containers ``<prefix><part>`` (an ``nn.ModuleDict`` or ``nn.ParameterDict`` keyed by
    adapter name) are created by :class:`~comol.mixture.adapters.AdapterContainers` and listed in peft's
    ``adapter_layer_names``.

    Args:
        base_layer: the frozen ``nn.Linear`` or ``Conv1D``.
        context: the owning tuner's :class:`RoutingContext`.
    """

    other_param_names: ClassVar[tuple[str, ...]] = ("adapter_config", "scaling")

    def __init__(self, base_layer: nn.Module, context: RoutingContext | None = None, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear | Conv1D):
            raise TypeError(
                f"{type(self).__name__} cannot adapt a {type(base).__name__}: comol adapts torch.nn.Linear and "
                "transformers' Conv1D layers. Remove this module from target_modules."
            )
        self.in_features, self.out_features = _get_in_out_features(base)
        self.is_conv1d = isinstance(base, Conv1D)
        self.init_adapter_containers(None, context)
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.implementation = "auto"  # how adapter_forward computes the update, see set_implementation
        self._resolved_implementations: dict[tuple[str, torch.device, torch.dtype], Any] = {}
        # adapter name -> (key of the weights it was built from, weights laid out for inference)
        self._inference_weights: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------
    # What a method implements
    # ----------------------------------------------------------------------------------------------
    def create_adapter(self, adapter_name: str, config: MixtureConfig) -> None:
        """Create this adapter's tensors in the ``<prefix><part>`` containers."""
        raise NotImplementedError

    def reset_adapter(self, adapter_name: str, config: MixtureConfig) -> None:
        """Initialise this adapter's tensors (called when ``config.init_weights`` asks for it)."""
        raise NotImplementedError

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive update.

        Args:
            adapter_name: which adapter.
            x: ``(..., d_in)`` input, already cast to the adapter's dtype.

        Returns:
            ``(..., d_out)``, including the ``alpha / r`` scaling.
        """
        raise NotImplementedError

    def fixed_gate_lora(
        self, adapter_name: str, gates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA factors equal to this adapter when its gates are frozen to ``gates``.

        Args:
            adapter_name: which adapter.
            gates: ``(E,)`` expert weights, or None for methods without a router.

        Returns:
            ``(A (r', d_in), B (d_out, r'))`` with the scaling folded into ``B``, so that the update is
            exactly ``B @ A @ x`` for every token routed with ``gates``.
        """
        raise MergeNotSupportedError(
            f"{type(self).__name__} cannot be written as a LoRA with a fixed gate; export is not supported."
        )

    def implementation_names(self) -> list[str]:
        """Names :meth:`set_implementation` accepts; ``"eager"`` is the method's reference forward.

        Default: ``["auto", "eager"]``, for a method with a single implementation.
        """
        return ["auto", "eager"]

    def resolve_implementation(self, name: str, x: torch.Tensor) -> Any:
        """What implementation ``name`` means for input ``x`` (its device and dtype); default: ``name``.

        Called once per ``(name, device, dtype)``; :meth:`implementation_for` caches the result.
        """
        return name

    def select_gates(self, adapter_name: str, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gates ``(..., E)`` float32 from router ``probs (..., E)`` float32 and the routed input ``x``.

        Default: soft routing, or the ``config.router_top_k`` largest gates renormalised. A method overrides
        it to sparsify or reweight differently (AdaMoLE's learned threshold).
        """
        top_k = getattr(self.adapter_config[adapter_name], "router_top_k", None)
        return probs if top_k is None else routing.top_k_gates(probs, min(top_k, probs.shape[-1]))

    def gates_from_logits(
        self, adapter_name: str, logits: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The routing body every routed method shares: ``logits (..., E)`` -> float32 softmax ->
        :meth:`select_gates` -> reported to observers (statistics, balancing loss) -> gates ``(..., E)`` float32.

        Args:
            adapter_name: which adapter routes.
            logits: ``(..., E)`` router scores.
            x: ``(..., k)`` the router's input (passed to :meth:`select_gates`).
            mask: ``(...)`` bool token mask, or None to take it from the routing context.
        """
        probs = routing.softmax_f32(logits)  # (..., E) float32
        gates = self.select_gates(adapter_name, probs, x)  # (..., E) float32
        aux_loss_coef = getattr(self.adapter_config[adapter_name], "aux_loss_coef", 0.0)
        self.observe_routing(adapter_name, probs, gates, mask=mask, aux_loss_coef=aux_loss_coef)
        return gates

    def after_optimizer_step(self, adapter_name: str) -> None:
        """Non-gradient state updates after each optimizer step (e.g. FlyLoRA's balancing bias). Default: none."""

    def layer_num_experts(self, adapter_name: str) -> int | None:
        """Experts ``E`` of this adapter in this layer (None for a method without a per-layer router)."""
        return getattr(self.adapter_config[adapter_name], "num_experts", None)

    def static_gates(self, adapter_name: str) -> torch.Tensor | None:
        """``(E,)`` gates if they do not depend on the input (then the adapter can be merged), else None.

        Default: a single expert (softmax over one expert is 1 for every token); otherwise routed.
        """
        return torch.ones(1) if self.layer_num_experts(adapter_name) == 1 else None

    def check_fixed_gates(
        self, adapter_name: str, gates: torch.Tensor | None, num_experts: int
    ) -> torch.Tensor:
        """``gates`` if it is an ``(E,)`` tensor for this layer's ``E``; else a ValueError naming layer and adapter."""
        if gates is None or tuple(gates.shape) != (num_experts,):
            got = None if gates is None else tuple(gates.shape)
            raise ValueError(
                f"Fixed gates for adapter {adapter_name!r} in layer {self.module_key or type(self).__name__!r} must "
                f"have shape ({num_experts},) (one weight per expert of this layer), got {got}."
            )
        return gates

    def merge_blocker(self, adapter_name: str) -> str | None:
        """Why this adapter cannot be merged into ``W`` (None if it can)."""
        config = self.adapter_config[adapter_name]
        if self.static_gates(adapter_name) is None:
            return (
                f"adapter {adapter_name!r} routes each token to a different mixture of experts, so its update "
                f"depends on the input and cannot be folded into the base weights (num_experts="
                f"{getattr(config, 'num_experts', '?')}). Keep the adapter unmerged, or export a LoRA for a "
                "fixed gate with comol.export_lora (an approximation of the mixture)."
            )
        return None

    # ----------------------------------------------------------------------------------------------
    # Shared machinery
    # ----------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        config: MixtureConfig,
        module_key: str | None = None,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` to this layer (peft calls this once per targeted module)."""
        if module_key is not None:
            self.module_key = module_key
        self._inference_weights.pop(adapter_name, None)
        self.adapter_config[adapter_name] = config
        self.scaling[adapter_name] = config.scaling
        self.adapter_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.create_adapter(adapter_name, config)
        self.reset_adapter(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_implementation(self, name: str) -> None:
        """Choose how this layer computes its update (``"auto"``: the fastest available, ``"eager"``: the
        reference); see :meth:`implementation_names`."""
        names = self.implementation_names()
        if name not in names:
            raise ValueError(
                f"{type(self).__name__} {self.module_key or ''}: unknown implementation {name!r}; "
                f"choose one of {names}."
            )
        self.implementation = name

    def implementation_for(self, x: torch.Tensor) -> Any:
        """The resolved :attr:`implementation` for ``x``'s device and dtype (cached)."""
        key = (self.implementation, x.device, x.dtype)  # the device itself: its .type costs as much again
        resolved = self._resolved_implementations.get(key)
        if resolved is None:
            resolved = self._resolved_implementations[key] = self.resolve_implementation(key[0], x)
        return resolved

    def inference_weights(
        self,
        adapter_name: str,
        sources: tuple[torch.Tensor, ...],
        build: Callable[..., T],
        settings: tuple[Any, ...] = (),
    ) -> T:
        """``build(*sources, *settings)``: weights derived from ``sources`` for inference (e.g. CoMoL's scaled
        cores), kept between calls while the layer is in eval mode and neither a source nor ``settings`` changed.

        A source counts as unchanged while its storage (``data_ptr``) and version counter are: optimizer steps,
        ``load_state_dict`` and every in-place op bump the counter. Writes through ``.data`` do not, so the kept
        weights are dropped whenever the layer enters or leaves training mode (``model.train()`` /
        ``model.eval()``) and can be dropped by hand with :meth:`clear_inference_weights`. Nothing is kept in
        training mode, while tracing for ``torch.compile``, for inference tensors, or when ``torch.distributed``
        is initialised (sharded weights, FSDP and ZeRO-3, are gathered into reused storage).

        Args:
            adapter_name: the adapter the weights belong to.
            sources: the tensors the weights are derived from.
            build: computes the weights from ``sources`` and ``settings`` (called with both, so that a hit creates
                no closure: this runs once per layer and decoded token).
            settings: the other values ``build`` reads (e.g. the scaling), compared by equality.
        """
        if self.training or torch.compiler.is_compiling() or _sharding_possible():
            return build(*sources, *settings)
        try:
            key = (*map(_version_of, sources), *map(_data_ptr_of, sources), *settings)
        except RuntimeError:  # inference tensors have no version counter
            return build(*sources, *settings)
        kept = self._inference_weights.get(adapter_name)
        if kept is not None and kept[0] == key:
            return kept[1]
        weights = build(*sources, *settings)
        self._inference_weights[adapter_name] = (key, weights)
        return weights

    def clear_inference_weights(self) -> None:
        """Drop the weights :meth:`inference_weights` keeps (they are rebuilt on the next call)."""
        self._inference_weights.clear()

    def train(self, mode: bool = True) -> MixtureLayer:
        """``nn.Module.train``; also drops the weights kept for inference (see :meth:`inference_weights`)."""
        self._inference_weights.clear()
        return super().train(mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter``, dropping what was kept for the adapter's inference too."""
        self._inference_weights.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        """The dtype the adapter computes in: that of its first tensor (called on every forward, so the
        containers are read from ``_modules`` directly rather than through ``nn.Module.__getattr__``)."""
        modules = self._modules
        for layer_name in self.adapter_layer_names:
            container = modules.get(layer_name)
            if container is None:
                continue
            item = container._modules.get(adapter_name)  # a ModuleDict's entry, else a ParameterDict's
            if item is None:
                item = container._parameters.get(adapter_name)
            if item is None and adapter_name in container:  # FSDP1's views, plain attributes during forward
                item = container[adapter_name]
            if item is not None:
                if isinstance(item, torch.Tensor):
                    tensor = item
                else:  # a module: its weight, else its first parameter
                    tensor = item._parameters.get("weight")
                    if tensor is None:
                        tensor = getattr(item, "weight", None)
                    tensor = tensor if isinstance(tensor, torch.Tensor) else next(item.parameters(), None)
                if tensor is not None:
                    return tensor.dtype
        base = self.get_base_layer()
        if base.weight.dtype.is_floating_point:
            return base.weight.dtype
        return getattr(base, "compute_dtype", None) or torch.float32  # a quantized base stores integers

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: the base layer plus every active adapter's update."""
        if self.context.adapter_names is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.adapter_config:
                continue
            delta = self.adapter_forward(name, self._cast_input_dtype(x, self.adapter_dtype(name)))
            result = result + (delta if delta.dtype == result_dtype else delta.to(result_dtype))
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``(B, ..., d_in) -> (B, ..., d_out)``: row ``b`` gets adapter ``context.adapter_names[b]`` only.

        Each adapter runs on its own rows (with their attention mask), exactly as it would alone; routing
        stays per token. Rows named ``"__base__"``, or an adapter this layer does not hold, get the base layer.
        """
        if self.merged:
            raise ValueError(
                f"{self.module_key}: cannot pass adapter_names while adapters are merged; unmerge them first."
            )
        result = self.base_layer(x, *args, **kwargs)  # (B, ..., d_out)
        if self.disable_adapters:
            return result
        for name, rows in self.context.adapter_rows(x.shape[0], x.device):
            if name not in self.adapter_config:
                continue
            with self.context.rows(rows):
                delta = self.adapter_forward(name, self._cast_input_dtype(x[rows], self.adapter_dtype(name)))
            result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # --- merging ------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(d_out, d_in)`` update ``Delta W`` of a mergeable adapter (in the layout of ``nn.Linear``)."""
        reason = self.merge_blocker(adapter_name)
        if reason is not None:
            raise MergeNotSupportedError(f"Cannot merge: {reason}")
        a, b = self.fixed_gate_lora(adapter_name, self.static_gates(adapter_name))
        return b @ a

    def quantized_merge_blocker(self) -> str | None:
        """Why no adapter can be merged into this layer's quantized base weight (None for a float base)."""
        quantization = quantization_of(self.get_base_layer())
        if quantization is None:
            return None
        return (
            f"the base layer is quantized ({quantization}), and merging writes the full-precision weights. "
            "Load the base model unquantized (e.g. dtype=torch.bfloat16), load the adapter onto it with "
            "PeftModel.from_pretrained, then merge; or keep the adapter unmerged on the quantized base."
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold mergeable adapters into the base weight (see :meth:`merge_blocker`)."""
        if (reason := self.quantized_merge_blocker()) is not None:
            raise MergeNotSupportedError(f"Cannot merge {self.module_key}: {reason}")
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.adapter_config:
                continue
            base = self.get_base_layer()
            delta = self.get_delta_weight(name)
            if self.is_conv1d:
                delta = delta.T
            merged = base.weight.data + delta.to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs found while merging adapter {name!r}; the weights are untouched."
                )
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base = self.get_base_layer()
            delta = self.get_delta_weight(name)
            if self.is_conv1d:
                delta = delta.T
            base.weight.data -= delta.to(base.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
