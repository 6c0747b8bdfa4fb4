"""float64 equivalence of each method with the naive formula of its paper (``naive.py``), random weights."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from comol.methods import build_config
from comol.mixture import mixture_layers

import naive
from cases import TARGETS
from conftest import Wrapper, randomize_adapter, tiny_model

# (method, config options, naive reference). Routed methods get E = 3 experts; FlyLoRA and DenseLoRA have
# no router (and no ``num_experts``).
_E = {"num_experts": 3}
REFERENCES = [
    ("comol", _E, naive.comol),
    ("comol", {**_E, "core_router": False}, naive.comol),
    ("comol", {**_E, "router_top_k": 2}, naive.comol),
    ("molora", _E, naive.molora),
    ("hydralora", _E, naive.hydralora),
    ("mola", {**_E, "router_top_k": 2}, naive.mola),
    ("adamole", _E, naive.adamole),
    ("adamole", {**_E, "max_threshold": 0.5}, naive.adamole),
    ("smear", _E, naive.smear),
    ("flylora", {"top_k": 2}, naive.flylora),
    ("flylora", {"top_k": 2, "selection": "magnitude"}, naive.flylora),
    ("denselora", {}, naive.denselora),
    ("denselora", {"activation": "silu"}, naive.denselora),
]
IDS = [f"{method}-{'-'.join(map(str, kw.values()))}" for method, kw, _ in REFERENCES]


def randomize(model: nn.Module, std: float) -> None:
    """Random adapter parameters, and random values for FlyLoRA's balancing bias (a buffer, zero at init)."""
    randomize_adapter(model, std=std)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "flylora_bias" in name:
                buffer.copy_(torch.randn(buffer.shape, generator=gen, dtype=torch.float64).to(buffer) * std)


@pytest.mark.parametrize(("method", "kwargs", "reference"), REFERENCES, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 12), (3, 5, 12)])
def test_layer_matches_paper_formula_float64(method, kwargs, reference, shape):
    torch.manual_seed(0)
    config = build_config(method, r=4, lora_alpha=8, target_modules=["proj"], **kwargs)
    model = get_peft_model(Wrapper(bias=True).double(), config)
    randomize(model, std=0.5)
    layer = model.base_model.model.proj
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("method", "kwargs", "reference"), REFERENCES, ids=IDS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_layers_match_paper_formula_float64(method, kwargs, reference, family, input_ids):
    config = build_config(method, r=4, lora_alpha=4, target_modules=TARGETS, **kwargs)
    model = get_peft_model(tiny_model(family, dtype=torch.float64), config)
    randomize(model, std=0.2)
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, key=key: captured.__setitem__(key, (args[0], out)))
        for key, layer in mixture_layers(model).items()
    ]
    model(input_ids)
    for hook in hooks:
        hook.remove()
    assert len(captured) == 2 * len(TARGETS)
    for key, (x, out) in captured.items():
        torch.testing.assert_close(
            out, reference(model.get_submodule(key), x), rtol=1e-10, atol=1e-10, msg=key
        )
