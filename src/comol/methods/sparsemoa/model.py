"""The SparseMoA tuner: peft's injection of the LoRA experts, then one :class:`SparseMoABlock` per block."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from peft.utils.integrations import init_empty_weights
from torch import nn

from comol.methods.sparsemoa.block import BLOCK_ATTR, SparseMoABlock, block_key
from comol.methods.sparsemoa.config import SparseMoAConfig
from comol.methods.sparsemoa.layer import SparseMoALayer
from comol.mixture import MixtureModel


class SparseMoAModel(MixtureModel):
    """peft tuner for SparseMoA (``peft.get_peft_model(model, SparseMoAConfig(...))``).

    Wraps every targeted linear layer in a :class:`SparseMoALayer` (peft's injection) and then gives every
    decoder block holding one a :class:`SparseMoABlock` under ``<block>.moa_block``.
    """

    prefix = "sparsemoa_"
    tuner_layer_cls = SparseMoALayer

    def _check_new_adapter_config(self, config: SparseMoAConfig) -> None:
        """Refuse, before anything is injected, an adapter that would hook other modules than the others."""
        super()._check_new_adapter_config(config)
        for name, other in self.peft_config.items():
            if other is config:
                continue
            same_mlp = not (config.parallel_adapter_size and other.parallel_adapter_size) or (
                other.mlp_module == config.mlp_module
            )
            if other.router_input_module != config.router_input_module or not same_mlp:
                raise ValueError(
                    f"Adapter {name!r} routes on {other.router_input_module or 'auto'!r} with its parallel adapter "
                    f"beside {other.mlp_module!r}; every SparseMoA adapter of a model must use the same "
                    "router_input_module and mlp_module."
                )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            self._attach_blocks(model, adapter_name)

    def _attach_blocks(self, model: nn.Module, adapter_name: str) -> None:
        config: SparseMoAConfig = self.peft_config[adapter_name]
        experts: dict[str, list[tuple[str, SparseMoALayer]]] = {}
        for key, module in model.named_modules():
            if isinstance(module, SparseMoALayer) and adapter_name in module.adapter_config:
                experts.setdefault(block_key(key), []).append((key, module))
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError(
                "SparseMoA needs the width of the decoder blocks' hidden states (model.config.hidden_size), "
                "which this model does not have."
            )
        for bkey, layers in experts.items():
            block = model.get_submodule(bkey)
            router_input = config.router_input_module or layers[0][0][len(bkey) + 1 :].split(".")[0]
            moa = getattr(block, BLOCK_ATTR, None)
            if moa is None:
                moa = SparseMoABlock(bkey, hidden_size, context=self.routing_context)
                # Active as the tuner's adapters, through peft's API (no tensors yet, so nothing is frozen).
                moa.set_adapter(list(self.active_adapters))
                block.add_module(BLOCK_ATTR, moa)
            moa.attach(block, router_input, config.mlp_module if config.parallel_adapter_size else None)
            for index, (_, layer) in enumerate(layers):
                layer.gate_index[adapter_name] = index
                layer.block_gates = moa.gates
            moa.update_layer(adapter_name, config, num_lora_experts=len(layers))
            moa.reference = (layers[0][1].get_base_layer(),)
            moa._move_adapter_to_device_of_base_layer(adapter_name)  # peft's: device and dtype, meta skipped
            moa.set_adapter(moa.active_adapters, inference_mode=config.inference_mode)

    def blocks(self) -> list[SparseMoABlock]:
        """The :class:`SparseMoABlock` of every adapted decoder block."""
        return [module for module in self.model.modules() if isinstance(module, SparseMoABlock)]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for block in self.blocks():
            block.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for block in self.blocks():
            block.delete_adapter(adapter_name)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        blocks = {block.module_key: block for block in self.blocks()}
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        for key, block in blocks.items():
            block.detach()
            delattr(model.get_submodule(key), BLOCK_ATTR)
        return model
