"""The counting engine: the base model built on PyTorch's ``meta`` device, the real adapter injected, parameters summed.

The base model is built from its config on the ``meta`` device (shapes only, no memory, no download), the
method's adapter is injected with ``peft.get_peft_model`` exactly as for training, and the parameters with
``requires_grad`` are summed. Nothing is computed from a formula, so the counts follow the code: a change of a
method's parametrisation shows up here.

Presets hold the real dimensions of the models used in the CoMoL paper (arXiv 2603.00573, section 4); any
transformers ``config.json`` works as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The paper's adapted modules (section 4.1): query, key, value, output and down projections.
PAPER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-8b": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "qwen3-14b": {
        "model_type": "qwen3",
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
"""Model presets: the real dimensions of the paper's base models (no weights are ever loaded)."""


def load_model_config(model: str | Path) -> Any:
    """A transformers config from a preset name (see :data:`PRESETS`) or a ``config.json`` path.

    Args:
        model: preset name (case-insensitive), a ``config.json`` file, or a directory holding one.

    Returns:
        A ``transformers.PretrainedConfig``.
    """
    from transformers import AutoConfig

    key = str(model).lower()
    if key in PRESETS:
        values = dict(PRESETS[key])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json file."
        )
    values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; is it a transformers config.json?")
    return AutoConfig.for_model(model_type, **values)


def build_meta_model(model_config: Any) -> nn.Module:
    """The causal LM of ``model_config`` with every tensor on the ``meta`` device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def method_config(method: str, **options: Any) -> Any:
    """The peft config of ``method`` with the paper's conventions filled in where not given.

    Defaults: ``target_modules`` = q, k, v, o, down projections; ``lora_alpha`` = ``r`` (the paper sets
    alpha = 1 x rank for every method). Unknown options are rejected by :func:`comol.methods.build_config`.

    Args:
        method: a registered method name (``comol.methods.method_names()``).
        **options: config fields, e.g. ``r=16, num_experts=8, core_router=False``.
    """
    from comol.methods import build_config

    options = dict(options)
    options.setdefault("target_modules", list(PAPER_TARGETS))
    if "r" in options:
        options.setdefault("lora_alpha", options["r"])
    return build_config(method, **options)


@dataclass
class ParamCount:
    """Parameters of an adapted model.

    Attributes:
        trainable: parameters with ``requires_grad`` (what an optimizer updates).
        frozen_adapter: adapter tensors that are saved with the adapter but not trained (e.g. FlyLoRA's
            frozen random ``A``), parameters or buffers.
        adapted_modules: number of base modules wrapped by the adapter.
        base: parameters of the base model.
    """

    trainable: int
    frozen_adapter: int
    adapted_modules: int
    base: int
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "trainable_params": self.trainable,
            "trainable_millions": round(self.trainable / 1e6, 4),
            "frozen_adapter_params": self.frozen_adapter,
            "adapted_modules": self.adapted_modules,
            "base_params": self.base,
        }


def _count(peft_model: nn.Module, method: str, settings: dict[str, Any]) -> ParamCount:
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = peft_model.base_model.prefix  # "lora_", "comol_", ...: peft names every adapter tensor with it
    trainable = frozen = base = 0
    for name, tensor in [*peft_model.named_parameters(), *peft_model.named_buffers()]:
        is_param = isinstance(tensor, nn.Parameter)
        if is_param and tensor.requires_grad:
            trainable += tensor.numel()
        elif prefix in name:
            frozen += tensor.numel()
        elif is_param:
            base += tensor.numel()
    # Tuner layers wrapping a base module (SparseMoA's per-block routers wrap none).
    layers = sum(isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer") for m in peft_model.modules())
    return ParamCount(trainable, frozen, layers, base, method, settings)


@contextmanager
def adapted(base_model: nn.Module, config: Any) -> Iterator[nn.Module]:
    """Inject ``config`` into ``base_model`` for the duration of the block, then remove it again."""
    from peft import get_peft_model

    peft_model = get_peft_model(base_model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def count_on(base_model: nn.Module, method: str, **options: Any) -> ParamCount:
    """Count ``method``'s parameters on an existing (meta) base model, which is left unchanged."""
    config = method_config(method, **options)
    with adapted(base_model, config) as peft_model:
        return _count(peft_model, method, options)


def count_params(model: str | Path, method: str, **options: Any) -> ParamCount:
    """Trainable parameters of ``method`` on ``model``, measured on the real adapter built on ``meta``.

    Args:
        model: preset name or ``config.json`` path (see :func:`load_model_config`).
        method: registered method name.
        **options: config fields of the method (see :func:`method_config` for the defaults).

    Example:
        >>> count_params("qwen3-8b", "lora", r=16).trainable  # doctest: +SKIP
        24772608
    """
    return count_on(build_meta_model(load_model_config(model)), method, **options)


def count_params_by_depth(model: str | Path, method: str, **options: Any) -> int:
    """Trainable parameters of the full-depth model, counted on 1-, 2- and 3-layer copies of it.

    Every decoder layer of the models here has the same shapes, so the count is ``a + b * num_layers``
    (``a``: tensors shared across layers, ``b``: per layer). The real adapter is built on copies of the
    config with 1, 2 and 3 layers (all other dimensions unchanged); if the three counts are not affine in
    depth (a method whose layers differ), this raises instead of extrapolating. Much faster than
    :func:`count_params` and equal to it (``tests/test_params.py`` checks both on the same rows).

    Args:
        model: preset name or ``config.json`` path.
        method: registered method name.
        **options: config fields of the method.

    Returns:
        The exact trainable-parameter count at the model's real depth.
    """
    config = load_model_config(model)
    depth = config.num_hidden_layers
    counts = []
    for layers in (1, 2, 3):
        shallow = load_model_config(model)
        shallow.num_hidden_layers = layers
        if getattr(shallow, "layer_types", None) is not None:
            shallow.layer_types = shallow.layer_types[:layers]
        counts.append(count_on(build_meta_model(shallow), method, **options).trainable)
    per_layer = counts[1] - counts[0]
    if counts[2] - counts[1] != per_layer:
        raise ValueError(f"{method}'s parameter count is not affine in depth ({counts}); use count_params.")
    return counts[0] + per_layer * (depth - 1)


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict; values are read as JSON when they parse (``8``, ``true``, ``[1,2]``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Options are key=value pairs, got {pair!r}.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options
