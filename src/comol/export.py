"""Export a mixture adapter with its gates frozen as a plain peft LoRA adapter.

Token-level routing cannot be folded into ``W``, but for one fixed gate vector per layer a CoMoL adapter
*is* a LoRA: ``Delta W = (alpha/r) B (sum_e g_e M_e) A``. :func:`export_lora` writes that LoRA (same rank)
so the adapter can be served on LoRA-only stacks. It is exact for the gates given and an
**approximation** of the CoMoL model, whose gates vary per token. :func:`calibrate_gates` measures the mean
gate of each layer over calibration data, the usual choice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from comol.mixture.model import mixture_layers
from comol.mixture.stats import RouterStats

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_gates(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean gate ``(E,)`` of every mixture layer over ``batches`` (padding excluded).

    Args:
        model: a ``PeftModel`` with a comol adapter.
        batches: model inputs, e.g. ``{"input_ids": ..., "attention_mask": ...}``.

    Returns:
        ``{module name: (E,) float32}``, keys as in ``model.named_modules()``.
    """
    was_training = model.training
    model.eval()
    with RouterStats(model) as stats:
        for batch in batches:
            model(**batch)
        gates = stats.mean_gates()
    model.train(was_training)
    if not gates:
        raise ValueError("No routing happened on the calibration batches (are they empty?).")
    return gates


@torch.no_grad()
def export_lora(
    model: nn.Module,
    output_dir: str | os.PathLike,
    gates: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    adapter_name: str = "default",
) -> LoraConfig:
    """Write the adapter, with gates frozen, as a peft LoRA adapter directory.

    Args:
        model: a ``PeftModel`` (or tuner) holding a comol adapter.
        output_dir: where ``adapter_config.json`` and ``adapter_model.safetensors`` go.
        gates: per-layer ``{module name: (E,)}`` (from :func:`calibrate_gates`), one ``(E,)`` tensor for all
            layers, or None for the uniform gate ``1/E``.
        adapter_name: which adapter to export.

    Returns:
        The ``LoraConfig`` written. Load the result with ``PeftModel.from_pretrained(base, output_dir)``.
    """
    layers = {
        name: layer for name, layer in mixture_layers(model).items() if adapter_name in layer.adapter_config
    }
    if not layers:
        raise ValueError(f"No comol layer holds an adapter named {adapter_name!r}.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for name, layer in layers.items():
        num_experts = layer.layer_num_experts(adapter_name)  # per layer: MoLA varies E by depth
        if isinstance(gates, Mapping):
            if name not in gates:
                raise KeyError(f"No gates given for layer {name!r}; calibrate_gates covers every layer.")
            layer_gates = gates[name]
        elif isinstance(gates, torch.Tensor):
            layer_gates = gates
        else:
            layer_gates = None if num_experts is None else torch.full((num_experts,), 1.0 / num_experts)
        a, b = layer.fixed_gate_lora(adapter_name, None if layer_gates is None else layer_gates.float())
        key = _peft_key(name)
        tensors[f"{key}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = b.detach().cpu().contiguous()
        ranks[key.removeprefix("base_model.model.")] = a.shape[0]
        fan_in_fan_out = fan_in_fan_out or layer.is_conv1d
    source_config = next(iter(layers.values())).adapter_config[adapter_name]
    config = lora_config_for(ranks, fan_in_fan_out, source_config)
    _write_adapter_dir(Path(output_dir), config, tensors)
    logger.info("Exported %d layers as a LoRA adapter to %s", len(layers), output_dir)
    return config


def _peft_key(module_name: str) -> str:
    """State-dict key prefix peft's LoRA uses for ``module_name`` (as found under a ``PeftModel``)."""
    name = module_name
    if name.startswith("base_model.model."):
        return name
    if name.startswith("model."):  # named from the tuner, whose child is the transformers model
        return f"base_model.{name}"
    return f"base_model.model.{name}"


def _write_adapter_dir(output_dir: Path, config: LoraConfig, tensors: dict[str, Any]) -> None:
    """Write config and weights atomically: a temp dir in the same parent, then rename into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "comol_export.json").write_text(
        json.dumps({"note": "LoRA with frozen gates exported from a comol mixture adapter (approximation)."})
    )
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old")
        os.replace(output_dir, backup)
        os.replace(tmp, output_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)


def lora_config_for(ranks: Mapping[str, int], fan_in_fan_out: bool, source_config: Any) -> LoraConfig:
    """The ``LoraConfig`` of LoRA factors whose scaling is already folded into ``B``.

    Args:
        ranks: module name (without the ``base_model.model.`` prefix) -> rank of its factors.
        fan_in_fan_out: True for transformers' ``Conv1D`` layers (GPT-2).
        source_config: the config the factors come from (base model name and task type are kept).

    ``lora_alpha`` equals each module's rank (through ``rank_pattern`` / ``alpha_pattern``), so peft's
    scaling is 1 everywhere.
    """
    rank = max(ranks.values())
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={k: v for k, v in ranks.items() if v != rank},
        alpha_pattern={k: v for k, v in ranks.items() if v != rank},
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=source_config.base_model_name_or_path,
        task_type=source_config.task_type,
    )
