"""SparseMoA's own behaviour: the block router against the naive formula of the MoA paper (float64, random
weights), threshold sparsity and its zero gradient, Soft MoA, parameter count, unloading, gradient
checkpointing, incremental decoding and clear errors."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import comol
from comol.methods import build_config
from comol.methods.sparsemoa import SparseMoABlock, SparseMoALayer
from comol.mixture import mixture_layers

import naive
from cases import TARGETS
from cases import adapted as shared_adapted
from conftest import VOCAB, randomize_adapter, tiny_model


def adapted(family: str = "llama", **kwargs):
    return shared_adapted("sparsemoa", family, **kwargs)


def blocks(model) -> dict[str, SparseMoABlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseMoABlock)}


def decoder_layers(model):
    return model.base_model.model.model.layers


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "options",
    [{}, {"sparse": False}, {"router_hidden_factor": 0}, {"max_threshold": 1.0}],
    ids=["sparse", "soft", "linear-router", "max-threshold-1"],
)
def test_model_matches_paper_formula_float64(family, options, input_ids):
    """Every expert's output and the MLP's output equal the per-token formula, with gates computed per token
    from the attention input of the block."""
    model = adapted(family, dtype=torch.float64, std=0.5, **options)
    with torch.no_grad():  # router logits of order 1, so that gates spread around the thresholds
        for block in blocks(model).values():
            if block.adapter_config["default"].router_hidden_factor:
                block.sparsemoa_router_down["default"].weight.mul_(0.05)
    captured: dict[str, tuple] = {}

    def keep(key):
        return lambda mod, args, kwargs, out: captured.__setitem__(
            key, (kwargs.get("hidden_states", args[0] if args else None), out)
        )

    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.self_attn.register_forward_hook(keep(f"attn{i}"), with_kwargs=True))
        handles.append(layer.mlp.register_forward_hook(keep(f"mlp{i}"), with_kwargs=True))
    for key, layer in mixture_layers(model).items():
        handles.append(layer.register_forward_hook(keep(key), with_kwargs=True))
    model(input_ids)
    for handle in handles:
        handle.remove()

    gates_used = []
    for i, layer in enumerate(decoder_layers(model)):
        block = layer.moa_block
        u = captured[f"attn{i}"][0].reshape(-1, 32)  # (N, d): the block's normalised input
        gates = torch.stack([naive.sparsemoa_gates(block, token) for token in u])  # (N, E)
        assert gates.shape == (u.shape[0], len(TARGETS) + 1)
        gates_used.append(gates)
        for key, expert in mixture_layers(layer).items():
            x, out = captured[next(k for k in captured if k.endswith(f"layers.{i}.{key}"))]
            expected = naive.sparsemoa_expert(expert, x.reshape(-1, x.shape[-1]), gates)
            torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-10, atol=1e-10, msg=key)
        v, mlp_out = captured[f"mlp{i}"]
        down_out = captured[next(k for k in captured if k.endswith(f"layers.{i}.mlp.down_proj"))][1]
        expected = down_out.reshape(-1, 32) + naive.sparsemoa_parallel_adapter(
            block, v.reshape(-1, 32), gates
        )
        torch.testing.assert_close(mlp_out.reshape(-1, 32), expected, rtol=1e-10, atol=1e-10)
    gates = torch.cat(gates_used)
    if options.get("sparse", True):
        skipped = (gates == 0).double().mean()
        assert 0.1 < skipped < 0.9, f"random weights should skip some experts, not all ({skipped:.2f})"
    else:
        assert (gates > 0).all()


def test_threshold_skips_experts_and_gets_a_zero_gradient(input_ids):
    model = adapted(std=0.5)
    model.train()
    with comol.RouterStats(model) as stats:
        model(input_ids, labels=input_ids).loss.backward()
    summary = stats.summary()
    assert set(summary) == set(blocks(model))  # one router per decoder block, not per linear layer
    for entry in summary.values():
        assert len(entry["load"]) == len(TARGETS) + 1
        assert 0 < entry["active"] < len(TARGETS) + 1  # sparse: some experts are skipped
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, name  # every trainable parameter is in the graph (DDP/FSDP)
        if "sparsemoa_threshold" in name:
            assert torch.count_nonzero(param.grad) == 0, name  # the indicator has no gradient
        else:
            assert torch.count_nonzero(param.grad) > 0, name


def test_soft_moa_has_no_threshold_and_uses_every_expert(input_ids):
    model = adapted(sparse=False)
    assert not any("threshold" in name for name, _ in model.named_parameters())
    with comol.RouterStats(model) as stats, torch.no_grad():
        model(input_ids)
    assert all(entry["active"] == len(TARGETS) + 1 for entry in stats.summary().values())


def test_trainable_parameter_count_is_the_closed_form():
    """Per block: LoRA on each target + parallel adapter + SwiGLU router + threshold, all with biases."""
    d, d_ff, d_kv, r, a, experts = 32, 64, 16, 4, 16, len(TARGETS) + 1
    lora = r * ((d + d) + (d + d_kv) + (d + d_kv) + (d + d) + (d_ff + d))
    hidden = 4 * experts
    router = 2 * (d * hidden + hidden) + hidden * experts + experts
    per_block = lora + (2 * d * a + a + d) + router + (d + 1)
    model = adapted()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_block
    soft_linear = adapted(sparse=False, router_hidden_factor=0, parallel_adapter_size=0)
    expected = 2 * (lora + d * len(TARGETS) + len(TARGETS))
    assert sum(p.numel() for p in soft_linear.parameters() if p.requires_grad) == expected


def test_layers_to_transform_gives_routers_only_to_adapted_blocks(input_ids):
    model = adapted(layers_to_transform=[1])
    assert list(blocks(model)) == ["base_model.model.model.layers.1.moa_block"]
    assert not hasattr(decoder_layers(model)[0], "moa_block")
    model(input_ids)


def test_unload_removes_blocks_and_hooks(input_ids):
    expected = tiny_model()(input_ids).logits
    model = adapted()
    assert not torch.allclose(model(input_ids).logits, expected)
    base = model.unload()
    assert not [m for m in base.modules() if isinstance(m, SparseMoABlock | SparseMoALayer)]
    for layer in base.model.layers:
        assert not layer.self_attn._forward_pre_hooks and not layer.mlp._forward_hooks
    torch.testing.assert_close(base(input_ids).logits, expected, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(input_ids):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = adapted(dtype=torch.float64)
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_cached_decoding_matches_full_forward():
    """Routing happens per forward call, so incremental decoding with a KV cache routes each new token
    exactly as a full forward over the whole sequence does."""
    model = adapted(dtype=torch.float64, std=0.5)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        full = model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, full)


def test_bf16_base_keeps_float32_adapter(input_ids):
    model = adapted(dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in model.named_parameters() if "sparsemoa_" in n}
    assert dtypes == {torch.float32}
    assert model(input_ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"target_modules": ["lm_head"]}, ValueError, "not inside a numbered block"),
        ({"mlp_module": "ffn"}, ValueError, "no child module 'ffn'.*self_attn, mlp"),
        ({"router_input_module": "attention"}, ValueError, "no child module 'attention'"),
        ({"max_threshold": 0.0}, ValueError, "max_threshold"),
        ({"max_threshold": 1.5}, ValueError, "max_threshold"),
        ({"parallel_adapter_size": -1}, ValueError, "parallel_adapter_size"),
        ({"router_hidden_factor": 2.5}, ValueError, "router_hidden_factor"),
    ],
)
def test_bad_settings_fail_clearly(options, error, match):
    with pytest.raises(error, match=match):
        adapted(**options)


def test_an_expert_called_outside_its_block_explains_itself():
    model = adapted()
    q_proj = decoder_layers(model)[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="call the whole decoder block"):
        q_proj(torch.randn(3, 32))


def test_second_adapter_must_route_on_the_same_module():
    model = adapted()
    config = build_config("sparsemoa", r=4, target_modules=TARGETS, mlp_module="self_attn")
    with pytest.raises(ValueError, match="same router_input_module and mlp_module"):
        model.add_adapter("other", config)
    assert not [name for name, _ in model.named_parameters() if ".other" in name]  # refused before injecting


def test_reloads_with_low_cpu_mem_usage_and_through_transformers(input_ids, tmp_path):
    """peft's meta-device loading and transformers' own ``load_adapter`` map every saved key back (the block's
    module name must not contain the method prefix, or transformers inserts the adapter name after it)."""
    model = adapted()
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    lazy = PeftModel.from_pretrained(tiny_model(), tmp_path, low_cpu_mem_usage=True)
    assert not [n for n, p in lazy.named_parameters() if p.device.type == "meta"]
    torch.testing.assert_close(lazy(input_ids).logits, expected, rtol=0, atol=0)
    plain = tiny_model()
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=0)


def test_blocks_follow_the_tuners_active_adapter_from_creation(input_ids):
    """Blocks route for a first adapter not named "default" (set through peft's set_adapter)."""
    config = build_config("sparsemoa", r=4, lora_alpha=8, target_modules=TARGETS)
    model = get_peft_model(tiny_model(), config, adapter_name="first")
    randomize_adapter(model)
    assert all(block.active_adapters == ["first"] for block in blocks(model).values())
    assert not torch.allclose(model(input_ids).logits, tiny_model()(input_ids).logits)
