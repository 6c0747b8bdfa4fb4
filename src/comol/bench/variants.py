"""What the layer and model benchmarks compare: a method, its options and the implementation it runs with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Variant:
    """One row of a layer or model table."""

    label: str
    method: str | None  # None: the frozen base alone
    options: dict[str, Any] = field(default_factory=dict)
    implementation: str | None = None  # None: the method's default ("auto")
    uses_experts: bool = True


def build_adapted(module: nn.Module, variant: Variant, r: int, targets: list[str]) -> nn.Module:
    """Wrap ``module`` with ``variant``'s adapter (or freeze it, for the base row).

    Adapters are built with ``B != 0`` (as during training), ``lora_alpha = 2 r``.
    """
    import peft

    import comol

    if variant.method is None:
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    config = comol.build_config(
        variant.method, r=r, lora_alpha=2 * r, target_modules=targets, **variant.options
    )
    if variant.method == "lora":
        config.init_lora_weights = False  # B != 0, as during training
    else:
        config.init_weights = False
    model = peft.get_peft_model(module, config)
    if variant.implementation is not None:
        model.base_model.set_implementation(variant.implementation)
    return model


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that require grad."""
    return [p for p in module.parameters() if p.requires_grad]
