"""The generic suite: every case of ``cases.py`` goes through the same peft-integration tests."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import comol
from comol.methods import build_config, config_fields
from comol.mixture import MergeNotSupportedError, collect_aux_loss, mixture_layers, routers

from cases import CASES, COMMON, Case
from cases import adapted as shared_adapted
from conftest import VOCAB, tiny_model

IDS = [case.id for case in CASES]


def make_config(case: Case, **overrides):
    return build_config(case.method, **{**COMMON, **case.kwargs, **overrides})


def adapted(
    case: Case, seed: int = 0, dtype: torch.dtype = torch.float32, randomize: bool = True, **overrides
):
    """The peft model of a case; adapter weights random unless ``randomize=False``."""
    return shared_adapted(
        case.method, case.family, dtype, randomize, seed=seed, **{**case.kwargs, **overrides}
    )


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init(case, batch):
    expected = logits(tiny_model(case.family), batch)
    model = adapted(case, randomize=False)
    assert mixture_layers(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapter_restores_base(case, batch):
    expected = logits(tiny_model(case.family), batch)
    model = adapted(case)
    assert not torch.allclose(logits(model, batch), expected)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_adapter_params_train(case, batch):
    model = adapted(case)
    model.train()
    prefix = make_config(case).peft_type.lower() + "_"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(prefix in name for name in trainable)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip_is_bit_identical(case, batch, tmp_path):
    model = adapted(case)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == case.method.upper()
    reloaded = PeftModel.from_pretrained(tiny_model(case.family), tmp_path)
    assert type(reloaded.peft_config["default"]) is type(model.peft_config["default"])
    assert torch.equal(logits(reloaded, batch), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_adapters_and_set_adapter(case, batch):
    model = adapted(case)
    first = logits(model, batch)
    model.add_adapter("other", make_config(case, init_weights=False))
    assert torch.equal(logits(model, batch), first)  # adding does not activate
    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(second, first)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".other" in n
    }
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), first)
    model.delete_adapter("other")
    assert torch.equal(logits(model, batch), first)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_only_when_the_method_allows_it(case, batch):
    model = adapted(case, dtype=torch.float64)
    expected = logits(model, batch)
    layers = mixture_layers(model).values()
    if any(layer.merge_blocker("default") is not None for layer in layers):
        with pytest.raises(MergeNotSupportedError, match="Cannot merge"):
            model.merge_and_unload()
        assert torch.equal(logits(model, batch), expected)  # nothing was touched
    else:
        merged = model.merge_and_unload()
        assert not mixture_layers(merged)
        torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_target_modules_raise(case):
    with pytest.raises(ValueError, match=r"(?i)target modules .*not found"):
        get_peft_model(tiny_model(case.family), make_config(case, target_modules=["no_such_proj"]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_routing_is_observed_in_float32(case, batch):
    """Every routing decision reaches the gate hooks and the statistics; router probabilities and gates are
    float32 even for a bf16 model; gates lie in [0, 1] and sum to 1 where the router normalises them."""
    model = adapted(case, dtype=torch.bfloat16)
    seen = {}
    for name, router in routers(model).items():
        observe = router.observe_routing

        def spy(adapter, probs, gates, *args, _observe=observe, _name=name, _router=router, **kwargs):
            seen.setdefault(_name, []).append((_router, probs.dtype, gates.dtype, gates.detach()))
            return _observe(adapter, probs, gates, *args, **kwargs)

        router.observe_routing = spy
    with comol.RouterStats(model) as stats:
        logits(model, batch)
    for router, probs_dtype, gates_dtype, gates in (entry for entries in seen.values() for entry in entries):
        assert probs_dtype == torch.float32 and gates_dtype == torch.float32
        assert ((gates >= 0) & (gates <= 1)).all()
        if router.normalized_gates:
            torch.testing.assert_close(gates.sum(-1), torch.ones_like(gates.sum(-1)))
    assert set(stats.summary()) == set(seen)


@pytest.mark.parametrize(
    "case", [c for c in CASES if "aux_loss_coef" in config_fields(c.method)], ids=lambda case: case.id
)
def test_aux_loss_counted_once_under_gradient_checkpointing(case, batch):
    model = adapted(case, aux_loss_coef=0.01)
    model.train()
    assert collect_aux_loss(model) is None
    torch.manual_seed(0)  # the same dropout masks in every forward (GPT-2 has dropout)
    model(**batch)
    plain = collect_aux_loss(model)
    assert plain is not None and plain.requires_grad
    assert collect_aux_loss(model) is None  # cleared
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    torch.manual_seed(0)
    out = model(**batch, labels=batch["input_ids"])
    aux = collect_aux_loss(model)
    torch.testing.assert_close(aux, plain)
    (out.loss + aux).backward()  # recomputation overwrites each layer's loss instead of adding one
    torch.manual_seed(0)
    model(**batch)
    torch.testing.assert_close(collect_aux_loss(model), plain)
