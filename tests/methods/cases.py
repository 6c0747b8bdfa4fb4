"""The adapter configurations every method must pass the generic suite with (``test_generic.py``).

One entry per configuration: ``Case(id, method, kwargs, family)``. ``method`` is a name registered in
:mod:`comol.methods`; ``kwargs`` are its config options on top of :data:`COMMON`; ``family`` picks the tiny
model (``tests/conftest.py``). Add a method by appending entries; the tests must not special-case any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model

from comol.methods import build_config

from conftest import randomize_adapter, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
COMMON: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}


def adapted(
    method: str,
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    randomize: bool = True,
    seed: int = 0,
    std: float = 0.3,
    **options: Any,
) -> PeftModel:
    """A tiny ``family`` model with a ``method`` adapter (options on top of :data:`COMMON`); the adapter's
    parameters are random unless ``randomize=False`` (B = 0 at init hides bugs)."""
    model = get_peft_model(
        tiny_model(family, seed=seed, dtype=dtype), build_config(method, **{**COMMON, **options})
    )
    if randomize:
        randomize_adapter(model, seed=seed, std=std)
    return model


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "llama"


CASES: list[Case] = [
    Case("comol", "comol", {"num_experts": 3}),
    Case("comol-input-router", "comol", {"num_experts": 3, "core_router": False}),
    Case("molora", "molora", {"num_experts": 3}),
    Case("molora-top1-gpt2", "molora", {"num_experts": 3, "router_top_k": 1, "target_modules": None}, "gpt2"),
    Case("molora-one-expert", "molora", {"num_experts": 1}),
    Case("hydralora", "hydralora", {"num_experts": 3}),
    Case("mola", "mola", {"num_experts": 4}),
    Case("mola-2-4", "mola", {"experts_per_layer": [2, 4]}, "qwen3"),
    Case("adamole", "adamole", {"num_experts": 3}),
    Case("smear", "smear", {"num_experts": 3}),
    Case("flylora", "flylora", {"top_k": 2}),
    Case("flylora-dense-qwen3", "flylora", {"top_k": 4}, "qwen3"),
    Case("denselora", "denselora"),
    Case("denselora-identity-gpt2", "denselora", {"activation": "identity", "target_modules": None}, "gpt2"),
    Case("sparsemoa", "sparsemoa"),
    Case("sparsemoa-qwen3", "sparsemoa", {"parallel_adapter_size": 8}, "qwen3"),
    Case(
        "sparsemoa-soft-linear-router-gpt2",
        "sparsemoa",
        {"sparse": False, "router_hidden_factor": 0, "target_modules": None},
        "gpt2",
    ),
]
