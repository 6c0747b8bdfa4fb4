"""CoMoL adapter: the paper's formula, peft integration, merging, export, statistics and errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import comol
from comol import CoMoLConfig
from comol.mixture import mixture_layers

import naive
from conftest import VOCAB, Wrapper, randomize_adapter, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


naive_comol = naive.comol


def llama_comol(dtype: torch.dtype = torch.float32, base: nn.Module | None = None):
    """The tests' default CoMoL adapter (r=4, alpha=8, 3 experts, the paper's targets) on a tiny Llama."""
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, target_modules=TARGETS)
    return get_peft_model(base if base is not None else tiny_model("llama", dtype=dtype), config)


def comol_layer(core_router: bool = True, top_k: int | None = None, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = Wrapper().to(dtype)
    config = CoMoLConfig(
        r=4,
        lora_alpha=8,
        num_experts=3,
        core_router=core_router,
        router_top_k=top_k,
        target_modules=["proj"],
        **kw,
    )
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model)
    return peft_model, peft_model.base_model.model.proj


@pytest.mark.parametrize("core_router", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (2, 2, 3, 12)])
def test_layer_matches_paper_formula_float64(core_router, shape):
    _, layer = comol_layer(core_router=core_router)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_comol(layer, x), rtol=1e-12, atol=1e-12)


def _cores_as_plain_attribute(layer: nn.Module) -> None:
    """What FSDP1 does to every parameter during forward: off ``_parameters``, a plain attribute instead."""
    container = layer.comol_cores
    cores = container._parameters.pop("default")
    object.__setattr__(container, "default", cores.detach().clone().requires_grad_())


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cores_found_where_fsdp1_puts_them_during_forward(grad):
    _, layer = comol_layer()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    expected = naive_comol(layer, x)
    _cores_as_plain_attribute(layer)
    assert "default" not in layer.comol_cores._parameters
    layer.eval()
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    # the dtype lookup finds them there too (read from the cores alone)
    layer.adapter_layer_names = ("comol_cores",)
    layer.comol_cores.default = layer.comol_cores.default.float()
    assert layer.adapter_dtype("default") == torch.float32


def test_top_k_matches_formula_and_keeps_k_experts():
    _, layer = comol_layer(top_k=2)
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_comol(layer, x), rtol=1e-12, atol=1e-12)
    seen = []
    handle = layer.register_gate_hook(lambda _l, _n, probs, gates, mask: seen.append(gates))
    layer(x)
    handle.remove()
    assert ((seen[0] > 0).sum(-1) == 2).all()
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(20))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_identity_at_init_and_disable_adapter(family, input_ids):
    base = tiny_model(family)
    with torch.no_grad():
        expected = base(input_ids).logits
    model = get_peft_model(base, CoMoLConfig(r=4, lora_alpha=4, num_experts=4, target_modules=TARGETS))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=0)
        randomize_adapter(model)
        assert not torch.allclose(model(input_ids).logits, expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=0)
        assert not torch.allclose(model(input_ids).logits, expected)


def test_one_identity_expert_with_input_routing_equals_peft_lora(input_ids):
    base = tiny_model("llama")
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapter(lora)
    model = get_peft_model(
        base,
        CoMoLConfig(
            r=4, lora_alpha=8, num_experts=1, core_router=False, init_cores="identity", target_modules=TARGETS
        ),
    )
    lora_layers = {k.replace("lora", ""): v for k, v in lora.named_modules()}
    with torch.no_grad():
        for key, layer in mixture_layers(model).items():
            twin = lora_layers[key]
            layer.comol_A["default"].weight.copy_(twin.lora_A["default"].weight)
            layer.comol_B["default"].weight.copy_(twin.lora_B["default"].weight)
        torch.testing.assert_close(model(input_ids).logits, lora(input_ids).logits, rtol=1e-6, atol=1e-6)


def test_gradcheck_layer():
    _, layer = comol_layer()
    layer.train()
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    params = [
        layer.comol_A["default"].weight,
        layer.comol_cores["default"],
        layer.comol_router["default"].weight,
    ]
    assert torch.autograd.gradcheck(lambda inp, *p: layer(inp), (x, *params))


def test_only_comol_params_train_and_count_matches_formula(input_ids):
    base = tiny_model("qwen3")
    r, num_experts = 4, 3
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in TARGETS
    }
    for core_router in (True, False):
        model = get_peft_model(
            tiny_model("qwen3"),
            CoMoLConfig(
                r=r, lora_alpha=r, num_experts=num_experts, core_router=core_router, target_modules=TARGETS
            ),
        )
        expected = sum(
            r * (d_in + d_out) + num_experts * r * r + num_experts * (r if core_router else d_in)
            for d_in, d_out in shapes.values()
        )
        trainable, _ = model.get_nb_trainable_parameters()
        assert trainable == expected
    randomize_adapter(model)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if "comol_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_save_reload_bit_identical_and_adapter_config(tmp_path, input_ids):
    model = llama_comol()
    randomize_adapter(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "COMOL" and saved["num_experts"] == 3 and saved["core_router"] is True
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert isinstance(reloaded.peft_config["default"], CoMoLConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)


def test_transformers_load_adapter(tmp_path, input_ids):
    model = llama_comol()
    randomize_adapter(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    plain = tiny_model("llama")
    plain.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=0)


def test_several_adapters_switch_delete_and_unload(tmp_path, input_ids):
    base = tiny_model("llama")
    with torch.no_grad():
        base_out = base(input_ids).logits
    model = llama_comol(base=base)
    randomize_adapter(model, seed=1)
    model.add_adapter("other", CoMoLConfig(r=2, lora_alpha=2, num_experts=5, target_modules=TARGETS))
    model.set_adapter("other")
    randomize_adapter(model, seed=2)
    with torch.no_grad():
        out_other = model(input_ids).logits
        model.set_adapter("default")
        out_default = model(input_ids).logits
    assert not torch.allclose(out_other, out_default)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, out_default)
        reloaded.set_adapter("other")
        assert torch.equal(reloaded(input_ids).logits, out_other)
    model.delete_adapter("other")
    assert all("other" not in layer.adapter_config for layer in mixture_layers(model).values())
    unloaded = model.unload()
    assert not mixture_layers(unloaded)
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids).logits, base_out, rtol=0, atol=0)


def test_bf16_base_with_fp32_adapter_and_autocast(input_ids):
    model = llama_comol(torch.bfloat16)
    layer = next(iter(mixture_layers(model).values()))
    assert layer.comol_cores["default"].dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    randomize_adapter(model)
    model.train()
    out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.comol_cores["default"].grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)


def test_merge_refused_for_mixtures_exact_for_one_expert(input_ids):
    model = llama_comol()
    randomize_adapter(model)
    with torch.no_grad():
        before = model(input_ids).logits
    with pytest.raises(comol.MergeNotSupportedError, match="cannot be folded"):
        model.merge_and_unload()
    with torch.no_grad():  # nothing was touched
        assert torch.equal(model(input_ids).logits, before)

    single = get_peft_model(
        tiny_model("llama", dtype=torch.float64),
        CoMoLConfig(r=4, lora_alpha=8, num_experts=1, target_modules=TARGETS),
    )
    randomize_adapter(single)
    with torch.no_grad():
        expected = single(input_ids).logits
        merged = single.merge_and_unload()
        assert not mixture_layers(merged)
        torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_gpt2_conv1d_matches_formula_and_merges(input_ids):
    base = tiny_model("gpt2", dtype=torch.float64)
    model = get_peft_model(base, CoMoLConfig(r=4, lora_alpha=8, num_experts=3))  # default targets for gpt2
    assert model.peft_config["default"].fan_in_fan_out
    randomize_adapter(model)
    layer = model.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), naive_comol(layer, x), rtol=1e-10, atol=1e-10)
    single = get_peft_model(
        tiny_model("gpt2", dtype=torch.float64), CoMoLConfig(r=4, lora_alpha=8, num_experts=1)
    )
    randomize_adapter(single)
    with torch.no_grad():
        expected = single(input_ids).logits
        torch.testing.assert_close(
            single.merge_and_unload()(input_ids).logits, expected, rtol=1e-10, atol=1e-10
        )


def test_export_lora_is_exact_for_frozen_gates(tmp_path, input_ids):
    model = llama_comol(torch.float64)
    randomize_adapter(model)
    batches = [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}]
    gates = comol.calibrate_gates(model, batches)
    assert len(gates) == 2 * len(TARGETS)
    for g in gates.values():
        torch.testing.assert_close(g.sum(), torch.tensor(1.0))
    comol.export_lora(model, tmp_path / "lora", gates=gates)
    # Reference: the CoMoL model with every router replaced by the calibrated constant gate.
    model.base_model.set_implementation("eager")  # the eager path goes through layer.route
    for key, layer in mixture_layers(model).items():
        fixed = gates[key].double()
        layer.route = lambda name, x, z, fixed=fixed: fixed.expand(*z.shape[:-1], -1)
    with torch.no_grad():
        expected = model(input_ids).logits
    lora = PeftModel.from_pretrained(tiny_model("llama", dtype=torch.float64), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids).logits, expected, rtol=1e-8, atol=1e-8)


def test_router_stats_load_entropy_and_padding():
    model = get_peft_model(
        tiny_model("llama"), CoMoLConfig(r=4, lora_alpha=8, num_experts=4, target_modules=TARGETS)
    )
    randomize_adapter(model)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    stats = comol.RouterStats(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    summary = stats.summary()
    assert len(summary) == 2 * len(TARGETS)
    for entry in summary.values():
        assert entry["tokens"] == 9  # the 3 padding tokens are skipped
        assert sum(entry["load"]) == pytest.approx(1.0)
        assert 0.0 < entry["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    stats.disable()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert next(iter(stats.summary().values()))["tokens"] == 9
    stats.close()
    assert all(not layer._gate_hooks for layer in mixture_layers(model).values())


def test_aux_loss_once_per_layer_with_gradient_checkpointing(input_ids):
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=4, aux_loss_coef=0.01, target_modules=TARGETS)
    model = get_peft_model(tiny_model("llama"), config)
    randomize_adapter(model)
    model.train()
    assert comol.collect_aux_loss(model) is None
    model(input_ids)
    plain = comol.collect_aux_loss(model)
    assert plain is not None and plain.requires_grad
    # each of the 10 layers contributes coef * E * sum f P >= coef
    assert plain.item() >= 0.01 * 2 * len(TARGETS) - 1e-6
    assert comol.collect_aux_loss(model) is None  # cleared

    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.enable_input_require_grads()
    out = model(input_ids, labels=input_ids)
    aux = comol.collect_aux_loss(model)
    torch.testing.assert_close(aux, plain)
    (out.loss + aux).backward()  # recomputation in backward must not add a second copy
    assert comol.collect_aux_loss(model) is not None  # recompute overwrote, did not accumulate ...
    layer = next(iter(mixture_layers(model).values()))
    assert len(layer._aux_losses) == 0  # ... and collect cleared it
    assert layer.comol_router["default"].weight.grad is not None


def test_gradient_checkpointing_gives_same_gradients(input_ids):
    def grads(checkpointing: bool):
        model = llama_comol()
        randomize_adapter(model)
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.enable_input_require_grads()
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("core_router", [True, False])
def test_torch_compile_fullgraph_training_and_cached_decoding(core_router, input_ids):
    """No graph break (``fullgraph=True``) in a training step nor in cached decoding, same numbers as eager."""
    config = CoMoLConfig(r=4, lora_alpha=8, num_experts=3, core_router=core_router, target_modules=TARGETS)
    model = get_peft_model(tiny_model("llama"), config)
    randomize_adapter(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    expected_loss = loss_fn(input_ids)
    expected_grads = torch.autograd.grad(expected_loss, params)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, params), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    model.eval()
    inner = model.base_model.model
    with torch.no_grad():
        prefill = inner(input_ids=input_ids, use_cache=True)
        expected = inner(input_ids=input_ids[:, -1:], past_key_values=prefill.past_key_values).logits
        decode = torch.compile(inner, fullgraph=True, backend="aot_eager")
        prefill = decode(input_ids=input_ids, use_cache=True)
        step = decode(input_ids=input_ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, expected, rtol=1e-4, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="num_experts"):
        CoMoLConfig(num_experts=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        CoMoLConfig(r=0)
    with pytest.raises(ValueError, match="init_cores"):
        CoMoLConfig(init_cores="xavier")
    with pytest.raises(ValueError, match="router_top_k"):
        CoMoLConfig(num_experts=4, router_top_k=5)
    with pytest.raises(ValueError, match=r"(?i)target modules .*not found"):
        get_peft_model(tiny_model("llama"), CoMoLConfig(target_modules=["no_such_proj"]))
    with pytest.raises(TypeError, match=r"adapts only torch\.nn\.Linear"):
        get_peft_model(tiny_model("llama"), CoMoLConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="no option"):
        comol.build_config("comol", rank=4)
    with pytest.raises(ValueError, match="Unknown method"):
        comol.build_config("nope")


def test_layers_to_transform_and_modules_to_save(tmp_path, input_ids):
    config = CoMoLConfig(
        r=4,
        lora_alpha=8,
        num_experts=3,
        target_modules=TARGETS,
        layers_to_transform=[1],
        layers_pattern="layers",
        modules_to_save=["lm_head"],
    )
    model = get_peft_model(tiny_model("llama"), config)
    assert sorted({key.split(".layers.")[1].split(".")[0] for key in mixture_layers(model)}) == ["1"]
    head = model.base_model.model.lm_head
    assert any(p.requires_grad for p in head.parameters())
    randomize_adapter(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, expected)
