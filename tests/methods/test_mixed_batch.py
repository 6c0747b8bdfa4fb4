"""Mixed-adapter batches (peft's ``adapter_names``): each row equals its adapter run alone, for every method."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from comol.methods import build_config

from cases import CASES, COMMON, Case
from conftest import VOCAB, randomize_adapter, tiny_model

IDS = [case.id for case in CASES]
NAMES = ["a", "__base__", "b", "a"]


def two_adapters(case: Case):
    """A float64 model with adapters "a" and "b" of the case, each with its own random weights, in eval mode."""
    config = build_config(case.method, **{**COMMON, **case.kwargs})
    model = get_peft_model(tiny_model(case.family, dtype=torch.float64), config, adapter_name="a")
    model.add_adapter("b", build_config(case.method, **{**COMMON, **case.kwargs}))
    for seed, name in enumerate(("a", "b")):
        model.set_adapter(name)
        randomize_adapter(model, seed=seed)
    return model.eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(NAMES), 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :3] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def alone(model, name: str, fn):
    """``fn()`` with only adapter ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixed_batch_forward_equals_each_adapter_alone(case, batch):
    model = two_adapters(case)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES).logits
        expected = {name: alone(model, name, lambda: model(**batch).logits) for name in set(NAMES)}
    assert (expected["a"] - expected["b"]).abs().max() > 1e-2  # the adapters differ, so a mix-up would show
    assert (expected["a"] - expected["__base__"]).abs().max() > 1e-2
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixed_batch_generate_equals_each_adapter_alone(case, batch):
    model = two_adapters(case)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(**batch, adapter_names=NAMES, **settings)
    expected = {name: alone(model, name, lambda: model.generate(**batch, **settings)) for name in set(NAMES)}
    for row, name in enumerate(NAMES):
        assert torch.equal(mixed[row], expected[name][row]), (row, name)


def test_mixed_batch_beam_search_repeats_names_per_beam(batch):
    model = two_adapters(CASES[0])
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    mixed = model.generate(**batch, adapter_names=NAMES, **settings)
    expected = {name: alone(model, name, lambda: model.generate(**batch, **settings)) for name in set(NAMES)}
    for row, name in enumerate(NAMES):
        assert torch.equal(mixed[row], expected[name][row]), (row, name)


def test_mixed_batch_is_refused_in_training_for_unknown_names_and_wrong_lengths(batch):
    model = two_adapters(CASES[0])
    with pytest.raises(ValueError, match=r"non-existing adapter.*: c\. Adapters of this model: a, b"):
        model(**batch, adapter_names=["a", "c", "b", "a"])
    with pytest.raises(ValueError, match="4 rows"):
        model(**batch, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(**batch, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**batch, adapter_names=NAMES)
    model.eval()
    assert model.base_model.routing_context.adapter_names is None  # nothing left behind by the refusals
