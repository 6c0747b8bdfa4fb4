"""The shared mechanism's own contracts: the method registry, LoRA initialisation, fixed-gate checks."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model

import comol
from comol.methods import build_config
from comol.mixture import mixture_layers
from comol.mixture.init import init_lora_pair_, kaiming_linear_
from comol.mixture.registration import METHODS, get_config_class, method_names

from cases import TARGETS
from conftest import randomize_adapter, tiny_model


def test_registry_lives_in_the_mechanism_and_holds_every_method():
    import comol.methods

    assert comol.methods.METHODS is METHODS  # one registry, re-exported
    assert set(method_names()) == {
        "lora",
        "comol",
        "molora",
        "hydralora",
        "mola",
        "adamole",
        "smear",
        "flylora",
        "denselora",
        "sparsemoa",
    }
    assert get_config_class("CoMoL") is comol.CoMoLConfig
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        get_config_class("nope")


def test_mechanism_does_not_import_the_methods_layer():
    import ast
    import pathlib

    root = pathlib.Path(comol.__file__).parent / "mixture"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("comol.methods", "comol.training", "comol.cli")), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("comol.methods") for a in node.names), path


def test_kaiming_linear_uses_the_fan_in_of_one_expert():
    torch.manual_seed(0)
    stacked = kaiming_linear_(torch.empty(64, 8, 256))  # (E, r, d_in): fan-in 256, not 8 * 256
    bound = 1 / math.sqrt(
        256
    )  # nn.Linear: kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert stacked.abs().max() <= bound
    assert stacked.abs().max() > 0.95 * bound


@pytest.mark.parametrize("zero_b", [True, False])
def test_init_lora_pair(zero_b):
    a, b = torch.full((4, 16), 9.0), torch.full((32, 4), 9.0)
    init_lora_pair_(a, b, zero_B=zero_b)
    assert 0 < a.abs().max() <= 1 / math.sqrt(16)
    assert (b.abs().max() == 0) == zero_b
    assert b.abs().max() <= 1 / math.sqrt(4)


@pytest.mark.parametrize("bad", [True, 0, 2.0])
def test_num_experts_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_experts"):
        build_config("comol", num_experts=bad)


@pytest.mark.parametrize("method", ["comol", "molora", "flylora"])
def test_fixed_gates_of_the_wrong_shape_name_layer_and_adapter(method, tmp_path):
    options = {"top_k": 2} if method == "flylora" else {"num_experts": 4}
    model = get_peft_model(tiny_model(), build_config(method, r=4, target_modules=TARGETS, **options))
    with pytest.raises(
        ValueError, match=r"adapter 'default' in layer '.*layers\.0\..*' must have shape \(4,\)"
    ):
        comol.export_lora(model, tmp_path / "x", gates=torch.ones(3))


@pytest.mark.parametrize("method", ["comol", "molora", "hydralora"])
def test_a_single_expert_is_static_and_merges(method, input_ids):
    model = get_peft_model(
        tiny_model(dtype=torch.float64), build_config(method, r=4, num_experts=1, target_modules=TARGETS)
    )
    randomize_adapter(model)
    for layer in mixture_layers(model).values():
        assert torch.equal(layer.static_gates("default"), torch.ones(1))
    with torch.no_grad():
        expected = model(input_ids).logits
        torch.testing.assert_close(model.merge_and_unload()(input_ids).logits, expected)


def test_export_uses_each_layers_own_expert_count(tmp_path, input_ids):
    # MoLA has 2 experts in layer 0 and 4 in layer 1: the default (uniform) gate must follow each layer.
    model = get_peft_model(
        tiny_model("qwen3", dtype=torch.float64),
        build_config("mola", r=4, experts_per_layer=[2, 4], router_top_k=None, target_modules=TARGETS),
    )
    randomize_adapter(model)
    comol.export_lora(model, tmp_path / "lora")
    for layer in mixture_layers(model).values():
        uniform = torch.full((layer.layer_num_experts("default"),), 1.0 / layer.layer_num_experts("default"))
        layer.route = lambda name, x, uniform=uniform: uniform.to(x).expand(*x.shape[:-1], -1)
    with torch.no_grad():
        expected = model(input_ids).logits
    lora = PeftModel.from_pretrained(tiny_model("qwen3", dtype=torch.float64), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids).logits, expected)


def test_denselora_declares_shared_state_so_peft_refuses_direct_injection():
    with pytest.raises(ValueError, match="shared state"):
        inject_adapter_in_model(build_config("denselora", r=4, target_modules=TARGETS), tiny_model())


def test_peft_disable_input_dtype_casting_reaches_every_mixture_layer(input_ids):
    """peft's switch works on comol models (it reads and sets ``cast_input_dtype_enabled`` on every tuner
    layer): outside it, a bf16 input reaches the adapter cast to the adapter's float32; inside it, as it came."""
    from peft.helpers import disable_input_dtype_casting

    model = get_peft_model(tiny_model(), build_config("comol", r=4, num_experts=2, target_modules=TARGETS))
    layer = next(iter(mixture_layers(model).values()))
    seen: list[torch.dtype] = []
    forward = layer.adapter_forward
    layer.adapter_forward = lambda name, x: (seen.append(x.dtype), forward(name, x.float()))[1]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    layer.get_base_layer().to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        with disable_input_dtype_casting(model):
            assert not layer.cast_input_dtype_enabled
            layer(x)
        layer(x)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert layer.cast_input_dtype_enabled
