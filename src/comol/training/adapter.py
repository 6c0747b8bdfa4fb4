"""Putting the configured adapter on a base model: target modules checked against the model, then peft."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch

from comol.loading import drop_gguf_quantizer
from comol.training.config import TRAINABLE_PARTS, TrainConfig

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)


def resolve_target_modules(model: torch.nn.Module, config: TrainConfig) -> list[str] | None:
    """The target modules to use, checked against the model's module names.

    ``None`` in the config means the architecture's default (the paper's q, k, v, o, down projections for
    Llama/Qwen-style models). Every listed name must match at least one module (peft's suffix rule).

    Raises:
        ValueError: a target module matches nothing in the model.
    """
    targets = config.adapter.target_modules
    if targets is None:
        from comol.mixture import DEFAULT_TARGET_MODULES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"No default target modules for model type {model_type!r}; set adapter.target_modules."
            )
        targets = DEFAULT_TARGET_MODULES[model_type]
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
        )
        raise ValueError(
            f"Target module(s) {missing} not found in {type(model).__name__}. Its linear layers are named: "
            f"{', '.join(leaves)}."
        )
    return list(targets)


def attach_adapter(model: torch.nn.Module, config: TrainConfig) -> PeftModel:
    """Wrap ``model`` with the configured adapter (``peft.get_peft_model``) and log its size.

    A model loaded from GGUF by the caller is unmarked as quantized first (:func:`comol.loading.drop_gguf_quantizer`);
    a bitsandbytes-quantized model goes through peft's ``prepare_model_for_kbit_training``.
    """
    import peft

    import comol  # noqa: F401  (registers comol's methods with peft)

    drop_gguf_quantizer(model)
    if getattr(model, "is_quantized", False):  # QLoRA: norms in float32, inputs that require grad, checkpointing
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if config.adapter.init_from is not None:
        logger.info("Starting from the saved adapter %s.", config.adapter.init_from)
        peft_model = peft.PeftModel.from_pretrained(model, config.adapter.init_from, is_trainable=True)
    else:
        peft_config = config.adapter.build(target_modules=resolve_target_modules(model, config))
        peft_model = peft.get_peft_model(model, peft_config)
    freeze_all_but(peft_model, config.adapter.trainable)
    trainable = sum(_numel(p) for p in peft_model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in peft_model.parameters())
    logger.info(
        "Method %s: %s trainable parameters (%.3f%% of %s).",
        config.adapter.method,
        f"{trainable:,}",
        100 * trainable / total,
        f"{total:,}",
    )
    return peft_model


def freeze_all_but(peft_model: torch.nn.Module, trainable: str) -> None:
    """Keep ``requires_grad`` only on the adapter parameters that ``adapter.trainable`` names.

    ``router`` keeps parameters under a ``<method>_router`` container, ``router+cores`` also ``<method>_cores``.

    Raises:
        ValueError: no adapter parameter matches (e.g. ``router`` for a method without a router).
    """
    parts = TRAINABLE_PARTS[trainable]
    if parts is None:
        return
    pattern = re.compile(rf"_(?:{'|'.join(parts)})\.")
    kept = 0
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.requires_grad = pattern.search(name) is not None
            kept += param.requires_grad
    if not kept:
        raise ValueError(
            f"adapter.trainable={trainable!r}: the adapter has no parameters of that kind; use adapter.trainable=all."
        )


def _numel(param: torch.Tensor) -> int:
    # A parameter partitioned by DeepSpeed ZeRO-3 (loaded under zero.Init) is an empty placeholder; ds_numel is
    # its full size.
    return int(getattr(param, "ds_numel", param.numel()))
