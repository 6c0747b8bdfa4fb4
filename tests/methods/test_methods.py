"""Each method's own edge cases: parameter shapes and counts, top-k sparsity, MoLA's layer-wise experts,
AdaMoLE's threshold, SMEAR's padding-aware instance routing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3Config

from comol.methods import build_config
from comol.mixture import mixture_layers
from comol.mixture.experts import mix_expert_outputs

from cases import TARGETS, adapted
from conftest import VOCAB, tiny_model


def gates_seen(model, **inputs) -> dict[str, torch.Tensor]:
    seen = {}
    handles = [
        layer.register_gate_hook(
            lambda _l, _n, probs, gates, mask, key=key: seen.__setitem__(key, (gates, mask))
        )
        for key, layer in mixture_layers(model).items()
    ]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


# --- parameter counts: the CoMoL paper's Table 2 (Qwen3-8B, q k v o down, r = 8, E = 8) ------------------
@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("molora", {}, 107_347_968),  # 107.35M
        ("hydralora", {}, 49_545_216),  # 49.55M
        ("mola", {}, 107_347_968),  # 107.35M (uniform 8 experts, the paper's setting)
        ("mola", {"experts_per_layer": [2, 4, 6, 8], "num_layers": 4}, 67_092_480),  # MoLA-2468: 67.09M
        ("adamole", {}, 108_380_340),  # 108.38M
        ("smear", {}, 107_347_968),
    ],
)
def test_parameter_count_matches_paper_table_2(method, kwargs, expected):
    # 4 of Qwen3-8B's 36 identical layers, on the meta device; the count is linear in the number of layers
    # (for MoLA-2468 each of the 4 layers stands for one quarter).
    config = Qwen3Config(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128,
    )  # fmt: skip
    with torch.device("meta"):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(config), build_config(method, r=8, lora_alpha=8, **kwargs)
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable * 9 == expected


@pytest.mark.parametrize(
    ("method", "a_shape"), [("molora", (3, 4, 32)), ("hydralora", (4, 32)), ("smear", (3, 4, 32))]
)
def test_parameter_shapes(method, a_shape):
    layer = adapted(method, num_experts=3).base_model.model.model.layers[0].self_attn.k_proj  # 32 -> 16
    assert tuple(getattr(layer, f"{method}_A")["default"].shape) == a_shape
    assert tuple(getattr(layer, f"{method}_B")["default"].shape) == (3, 16, 4)
    router = getattr(layer, f"{method}_router")["default"]
    assert tuple(router.weight.shape) == (3, 32) and router.bias is None


def test_mix_expert_outputs_equals_per_expert_sum():
    x, gates = torch.randn(2, 5, 6, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    lora_A, lora_B = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 7, 4, dtype=torch.float64)
    expected = sum(gates[..., e : e + 1] * (x @ lora_A[e].T @ lora_B[e].T) for e in range(3))
    torch.testing.assert_close(mix_expert_outputs(x, gates, lora_A, lora_B), expected)


# --- MoLA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mola_top_k_activates_exactly_k_experts_per_token(k, input_ids):
    model = adapted("mola", num_experts=4, router_top_k=k)
    seen = gates_seen(model, input_ids=input_ids)
    assert len(seen) == 2 * len(TARGETS)
    for gates, _ in seen.values():
        assert ((gates > 0).sum(-1) == k).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0]))


def test_mola_layer_wise_expert_counts_and_reload(tmp_path, input_ids):
    model = adapted("mola", family="qwen3", experts_per_layer=[2, 4])
    assert model.peft_config["default"].num_layers == 2 and model.peft_config["default"].num_experts == 4
    for key, layer in mixture_layers(model).items():
        expected = 2 if ".layers.0." in key else 4
        assert layer.mola_A["default"].shape[0] == expected == layer.mola_router["default"].out_features, key
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["experts_per_layer"] == [2, 4]
    reloaded = PeftModel.from_pretrained(tiny_model("qwen3"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_mola_groups_split_layers_into_contiguous_quarters():
    config = build_config("mola", experts_per_layer=[2, 4, 6, 8], num_layers=36)
    counts = [config.experts_for_layer(i) for i in range(36)]
    assert counts == [2] * 9 + [4] * 9 + [6] * 9 + [8] * 9
    assert config.num_experts == 8 and config.router_top_k == 2


def test_mola_config_errors():
    with pytest.raises(ValueError, match="router_top_k"):
        build_config("mola", experts_per_layer=[1, 4], router_top_k=2)
    with pytest.raises(ValueError, match="experts_per_layer"):
        build_config("mola", experts_per_layer=[0, 4])


# --- AdaMoLE ---------------------------------------------------------------------------------------
def test_adamole_activates_a_varying_number_of_experts(input_ids):
    model = adapted("adamole", num_experts=4)
    for layer in mixture_layers(model).values():
        torch.nn.init.normal_(layer.adamole_router["default"].weight, std=0.5)
        torch.nn.init.constant_(layer.adamole_threshold["default"].bias, 0.0)
    counts = torch.cat([(gates > 0).sum(-1) for gates, _ in gates_seen(model, input_ids=input_ids).values()])
    assert counts.min() >= 1 and counts.max() <= 4
    assert len(counts.unique()) > 1  # adaptive: not the same k for every token


def test_adamole_with_zero_threshold_is_molora(input_ids):
    model = adapted("adamole", num_experts=3)
    for layer in mixture_layers(model).values():
        torch.nn.init.constant_(layer.adamole_threshold["default"].bias, -1e4)  # tau = 0
        x = torch.randn(4, layer.in_features)
        probs = torch.softmax(layer.adamole_router["default"](x).float(), -1)
        torch.testing.assert_close(layer.select_gates("default", probs, x), probs)


def test_adamole_threshold_network_is_trained(input_ids):
    model = adapted("adamole", num_experts=3)
    model(input_ids, labels=input_ids).loss.backward()
    grads = [layer.adamole_threshold["default"].weight.grad for layer in mixture_layers(model).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_adamole_rejects_top_k():
    with pytest.raises(ValueError, match="threshold"):
        build_config("adamole", router_top_k=2)


# --- SMEAR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_smear_layer_ignores_padding(side):
    model = adapted("smear", num_experts=3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    real = torch.randn(1, 4, 32)
    pad = torch.randn(1, 3, 32) * 100  # large garbage that would move the mean
    padded = torch.cat([pad, real] if side == "left" else [real, pad], dim=1)
    mask = torch.tensor([[0] * 3 + [1] * 4]) if side == "left" else torch.tensor([[1] * 4 + [0] * 3])
    with torch.no_grad():
        layer.context.attention_mask = None
        expected = layer(real)
        layer.context.attention_mask = mask
        out = layer(padded)
    torch.testing.assert_close(out[mask.bool()], expected[0])


def test_smear_model_routes_padded_and_unpadded_sequences_alike():
    model = adapted("smear", num_experts=3)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    filler = torch.zeros(1, 2, dtype=torch.long)
    alone = gates_seen(model, input_ids=ids)
    key = next(k for k in alone if "layers.0.self_attn.q_proj" in k)  # sees the embeddings only
    for padded_ids, mask in [
        (torch.cat([filler, ids], 1), torch.tensor([[0, 0, 1, 1, 1, 1, 1]])),
        (torch.cat([ids, filler], 1), torch.tensor([[1, 1, 1, 1, 1, 0, 0]])),
    ]:
        padded = gates_seen(model, input_ids=padded_ids, attention_mask=mask)
        gates, mask_seen = padded[key]
        assert gates.shape == (1, 3) and mask_seen is None  # one decision per example
        torch.testing.assert_close(gates, alone[key][0])


def test_smear_generates_with_cache(input_ids):
    model = adapted("smear", num_experts=3)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, input_ids.shape[1] + 3)
