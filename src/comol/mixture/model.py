"""The tuner shared by all mixture-of-LoRA methods: injection, merging rules and the routing context.

peft's :class:`~peft.tuners.tuners_utils.BaseTuner` does the heavy lifting (finding target modules,
adapter switching, unloading, saving); a method's tuner is a subclass that names its layer class and
prefix, nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from comol.mixture.config import DEFAULT_TARGET_MODULES, MixtureConfig
from comol.mixture.layer import MergeNotSupportedError, MixtureLayer
from comol.mixture.loading import check_loaded_adapter
from comol.mixture.observe import BASE_ADAPTER, RoutingContext, RoutingObserver


class MixtureModel(BaseTuner):
    """Tuner for a mixture-of-LoRA method. Subclasses set :attr:`prefix` and :attr:`tuner_layer_cls`.

    Args:
        model: the transformers model to adapt.
        config: the method's config.
        adapter_name: name of the first adapter (``"default"``).
    """

    prefix: ClassVar[str] = ""
    tuner_layer_cls: ClassVar[type[MixtureLayer]] = MixtureLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = DEFAULT_TARGET_MODULES

    def _pre_injection_hook(self, model: nn.Module, config: MixtureConfig, adapter_name: str) -> None:
        if getattr(self, "routing_context", None) is None:
            self.routing_context = RoutingContext()
            context = self.routing_context

            def remember_mask(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                mask = kwargs.get("attention_mask")
                context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

            self._context_hook = model.register_forward_pre_hook(remember_mask, with_kwargs=True)

    def _create_and_replace(
        self,
        config: MixtureConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None.")
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(
                adapter_name, config, module_key=current_key, inference_mode=config.inference_mode
            )
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear | Conv1D):
            raise TypeError(
                f"Target module {current_key!r} is a {type(base).__name__}; {type(self).__name__} adapts only "
                "torch.nn.Linear and transformers' Conv1D layers. Remove it from target_modules."
            )
        config.fan_in_fan_out = isinstance(base, Conv1D)
        new_module = self.tuner_layer_cls(target, context=self.routing_context)
        new_module.update_layer(
            adapter_name, config, module_key=current_key, inference_mode=config.inference_mode
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a further adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches: ``model(..., adapter_names=[...])`` and ``generate`` (peft's API).

        Row ``b`` of the batch uses adapter ``adapter_names[b]`` (``"__base__"``: the base model); with beam
        search each name is repeated ``num_beams`` times. Only in eval mode; every name must be an adapter
        of this model. peft's ``PeftModel`` enters this around each forward and ``generate``.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode; call model.eval()."
            )
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(
                f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}."
            )
        known = {name for router in routers(self.model).values() for name in router.adapter_config}
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Adapters of this model: "
                f"{', '.join(sorted(known))} (and {BASE_ADAPTER!r} for the base model)."
            )
        num_beams = kwargs.get("num_beams")
        names = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats every row num_beams times
            names = [name for name in names for _ in range(num_beams)]
        context = self.routing_context
        previous, context.adapter_names = context.adapter_names, names
        try:
            yield
        finally:
            context.adapter_names = previous

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MixtureConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """peft's key mapping, then a refusal if the weights lack any tensor of the adapter being loaded."""
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        check_loaded_adapter(model, str(config.peft_type), cls.prefix, adapter_name, remapped)
        return remapped

    def _check_merge_allowed(self) -> None:
        """Refuse to merge before touching any weight if an active adapter depends on the input."""
        super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, MixtureLayer):
                if (reason := module.quantized_merge_blocker()) is not None:
                    raise MergeNotSupportedError(f"Cannot merge {module.module_key}: {reason}")
                for name in module.active_adapters:
                    if name in module.adapter_config and (reason := module.merge_blocker(name)) is not None:
                        raise MergeNotSupportedError(f"Cannot merge {module.module_key}: {reason}")

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        hook = getattr(self, "_context_hook", None)
        if hook is not None:
            hook.remove()
            self._context_hook = None
            self.routing_context = None
        return model

    def set_implementation(self, name: str) -> None:
        """Choose how every mixture layer computes its update (see :meth:`MixtureLayer.set_implementation`).

        ``"auto"`` (the default) picks the fastest available implementation, ``"eager"`` the reference; CoMoL
        also has ``"fused"``, ``"triton"`` and ``"stacked"`` (:mod:`comol.kernels`).
        """
        for module in self.model.modules():
            if isinstance(module, MixtureLayer):
                module.set_implementation(name)


def mixture_layers(model: nn.Module) -> dict[str, MixtureLayer]:
    """All mixture layers of ``model`` (a ``PeftModel``, tuner or plain module), by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MixtureLayer)}


def routers(model: nn.Module) -> dict[str, RoutingObserver]:
    """Every module of ``model`` that reports routing decisions (see :mod:`comol.mixture.observe`), by name.

    For per-layer methods these are their mixture layers; SparseMoA routes once per decoder block.
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, RoutingObserver)}


def after_optimizer_step(model: nn.Module) -> None:
    """Run every mixture layer's non-gradient update for its active adapters (call after ``optimizer.step()``).

    ``comol train`` does it through an optimizer step hook; see :func:`register_step_hooks`.
    """
    for layer in mixture_layers(model).values():
        for name in layer.active_adapters:
            if name in layer.adapter_config:
                layer.after_optimizer_step(name)


def register_step_hooks(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Call :func:`after_optimizer_step` after every ``optimizer.step()``; returns the hook's handle."""
    return optimizer.register_step_post_hook(lambda *_: after_optimizer_step(model))


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses recorded by the routers in the last forward; clears them.

    This is the one channel through which methods with auxiliary losses (load balancing) reach training:
    ``loss = outputs.loss + collect_aux_loss(model)`` (``comol train`` does it). Each router keeps only its
    latest loss per adapter, so recomputation under gradient checkpointing never counts a router twice.
    Each loss is already multiplied by its method's coefficient.

    Returns:
        A scalar tensor, or None if no layer recorded a loss.
    """
    losses = [loss for router in routers(model).values() for loss in router.pop_aux_losses()]
    if not losses:
        return None
    return torch.stack([loss.float() for loss in losses]).sum()
