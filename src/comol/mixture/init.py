"""Initialisation shared by every method: LoRA's "A Kaiming-uniform, B zero (or Kaiming)" rule.

peft's LoRA initialises ``A`` like ``nn.Linear`` (Kaiming-uniform with ``a = sqrt(5)``, fan-in = ``d_in``) and
``B`` to zero, so the adapted model starts as the base model; with ``init_weights=False`` ``B`` is random too.
Stacked expert tensors ``(E, r, d_in)`` / ``(E, d_out, r)`` are initialised one expert matrix at a time, so
the fan-in is that of one expert (``torch.nn.init`` would otherwise count ``r * d_in``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def kaiming_linear_(weight: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default initialisation of ``weight (..., out, in)``, per trailing matrix; in place."""
    for matrix in weight.view(-1, *weight.shape[-2:]) if weight.dim() > 2 else (weight,):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
    return weight


@torch.no_grad()
def init_lora_pair_(lora_A: torch.Tensor, lora_B: torch.Tensor, zero_B: bool) -> None:
    """LoRA's initialisation of a down/up pair, in place.

    Args:
        lora_A: ``(..., r, d_in)`` down projection(s): Kaiming-uniform per matrix.
        lora_B: ``(..., d_out, r)`` up projection(s): zero if ``zero_B`` (``config.init_weights``), else
            Kaiming-uniform per matrix.
    """
    kaiming_linear_(lora_A)
    if zero_B:
        nn.init.zeros_(lora_B)
    else:
        kaiming_linear_(lora_B)
