"""Reading trained peft LoRAs for composition, and refusing what cannot be composed exactly.

A LoRA is read from its adapter directory (or hub id) without touching any model: its ``LoraConfig`` is
checked field by field, its weights must be ``lora_A``/``lora_B`` pairs of 2-D tensors, and each module's
scaling is peft's (``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``, with ``rank_pattern`` and ``alpha_pattern``
resolved by peft's own ``get_pattern_key``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

_HARMLESS_FIELDS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
        "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern", "rank_pattern",
        "alpha_pattern", "init_lora_weights", "runtime_config", "megatron_core", "qalora_group_size",
        "eva_config",
    }
)  # fmt: skip
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, CorDA, LoftQ rewrite them).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Options of compose_loras that the construction itself sets.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class CompositionError(ValueError):
    """A LoRA cannot be composed exactly; the message names the adapter and the reason."""


@dataclass
class LoraFactors:
    """One LoRA's factors per adapted module.

    Attributes:
        label: the adapter's name in messages (its directory, hub id or ``adapters[i]``).
        modules: ``{module name: (A (r_e, d_in), B (d_out, r_e), scaling s_e)}``, names as in the base model's
            ``named_modules()``.
        task_type: the LoRA's peft task type.
    """

    label: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    task_type: str | None = None


def check_lora_config(config: PeftConfig, label: str) -> LoraConfig:
    """The config if a LoRA with it can be composed exactly, else :class:`CompositionError` saying why."""
    if not isinstance(config, LoraConfig):
        raise CompositionError(f"{label}: is a {config.peft_type} adapter, not a LoRA; only LoRAs compose.")
    if config.use_dora:
        raise CompositionError(
            f"{label}: is a DoRA adapter (use_dora=True); its magnitude vector rescales W + BA per column, "
            "which is not a low-rank update, so it cannot be composed."
        )
    if config.bias != "none" or config.lora_bias:
        raise CompositionError(
            f"{label}: trains biases (bias={config.bias!r}, lora_bias={config.lora_bias}); a bias is not a "
            "low-rank update of W and cannot be routed in core space."
        )
    if config.modules_to_save or config.trainable_token_indices:
        raise CompositionError(
            f"{label}: also trains whole modules or token embeddings (modules_to_save={config.modules_to_save}, "
            f"trainable_token_indices={config.trainable_token_indices}); those cannot be composed."
        )
    if config.init_lora_weights not in _SAFE_INITS:
        raise CompositionError(
            f"{label}: init_lora_weights={config.init_lora_weights!r} rewrites the base weights (PiSSA, OLoRA, "
            "CorDA and LoftQ do), so the LoRA is not an update of the shared base model."
        )
    defaults = LoraConfig()
    for f in fields(LoraConfig):
        if f.name in _HARMLESS_FIELDS:
            continue
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name):
            raise CompositionError(
                f"{label}: option {f.name}={value!r} is not supported by composition (only plain LoRAs on "
                "Linear layers, with any rank, alpha, rsLoRA and target modules, compose exactly)."
            )
    return config


def read_lora(source: str | os.PathLike | PeftModel, label: str | None = None) -> LoraFactors:
    """Read one LoRA: an adapter directory, a hub id, or a loaded ``PeftModel`` (its active adapter).

    Raises:
        CompositionError: the adapter is not a plain LoRA of Linear layers (see :func:`check_lora_config`).
    """
    if isinstance(source, PeftModel):
        return _read_loaded_lora(source, label or f"PeftModel({source.active_adapter!r})")
    label = label or str(source)
    try:
        config = PeftConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise CompositionError(f"{label}: cannot read adapter_config.json ({err}).") from err
    config = check_lora_config(config, label)
    weights = load_peft_weights(str(source), device="cpu")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = sorted((key for key in weights if _KEY.match(key) is None), key=_severity)
    if unexpected:
        raise CompositionError(f"{label}: {_unexpected_tensor(unexpected[0])}")
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if tensor.ndim != 2:
            raise CompositionError(
                f"{label}: {key} has shape {tuple(tensor.shape)}; only LoRAs of Linear layers compose."
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    modules = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise CompositionError(
                f"{label}: module {module} has only {sorted(pair)} in the adapter weights."
            )
        a, b = pair["lora_A"], pair["lora_B"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        if a.shape[0] != r or b.shape[1] != r:
            raise CompositionError(
                f"{label}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but its config "
                f"gives rank {r}; the adapter files disagree."
            )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[module] = (a, b, scaling)
    if not modules:
        raise CompositionError(f"{label}: the adapter has no LoRA weights.")
    return LoraFactors(label, modules, _task_type(config))


def _severity(key: str) -> int:
    """Order of the reasons to report: the most specific first."""
    return next((i for i, marker in enumerate(_MARKERS) if marker in key), len(_MARKERS))


_MARKERS = ("lora_magnitude_vector", "lora_embedding", ".bias")


def _unexpected_tensor(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"holds a DoRA magnitude vector ({key}); DoRA cannot be composed."
    if "lora_embedding" in key:
        return f"adapts an embedding ({key}); only LoRAs of Linear layers compose."
    if key.endswith(".bias"):
        return f"trains a bias ({key}); biases cannot be composed."
    return f"holds a tensor that is not a LoRA factor ({key}); only plain LoRAs compose."


def _read_loaded_lora(model: PeftModel, label: str) -> LoraFactors:
    name = model.active_adapter
    config = check_lora_config(model.peft_config[name], label)
    modules = {}
    for module_name, module in model.base_model.model.named_modules():
        if not isinstance(module, BaseTunerLayer) or name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLayer) or not isinstance(module.lora_A[name], nn.Linear):
            raise CompositionError(
                f"{label}: {module_name} is a {type(module).__name__}; only Linear LoRAs compose."
            )
        modules[module_name] = (
            module.lora_A[name].weight.detach(),
            module.lora_B[name].weight.detach(),
            float(module.scaling[name]),
        )
    if not modules:
        raise CompositionError(f"{label}: the model has no LoRA layers for adapter {name!r}.")
    return LoraFactors(label, modules, _task_type(config))


def _task_type(config: PeftConfig) -> str | None:
    task = config.task_type
    return None if task is None else str(getattr(task, "value", task))


def check_base_shapes(base_model: nn.Module, loras: Sequence[LoraFactors]) -> None:
    """Every LoRA module exists in ``base_model`` as a Linear (or Conv1D) of the LoRA's shape.

    Raises:
        CompositionError: naming the adapter, the module and the mismatch.
    """
    modules = dict(base_model.named_modules())
    for lora in loras:
        for name, (a, b, _) in lora.modules.items():
            base = modules.get(name)
            if base is None:
                raise CompositionError(f"{lora.label}: adapts {name}, which the base model does not have.")
            if not isinstance(base, nn.Linear | Conv1D):
                raise CompositionError(
                    f"{lora.label}: adapts {name}, a {type(base).__name__}; only Linear targets compose."
                )
            d_in, d_out = _get_in_out_features(base)
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise CompositionError(
                    f"{lora.label}: {name} is d_out x d_in = {b.shape[0]} x {a.shape[1]} in the LoRA but "
                    f"{d_out} x {d_in} in the base model; the LoRA was trained on a different base model."
                )
