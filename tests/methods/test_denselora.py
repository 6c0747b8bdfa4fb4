"""DenseLoRA's own cases: encoders/decoders shared across layers, the authors' formula in float64 (dropout at
their three positions included), counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comol.methods import build_config
from comol.mixture import mixture_layers

import naive
from cases import TARGETS
from cases import adapted as shared_adapted
from conftest import VOCAB


def adapted(family: str = "llama", **kwargs):
    return shared_adapted("denselora", family, **kwargs)


def test_matches_the_paper_formula_in_float64():
    model = adapted(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for layer in mixture_layers(model).values():
        x = torch.randn(2, 3, layer.in_features, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(x), naive.denselora(layer, x), rtol=1e-12, atol=1e-12)


class FixedMasks(nn.Module):
    """Stands in for the adapter's dropout: records what it is applied to and multiplies the i-th call's
    input by ``masks[i]``."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks
        self.inputs: list[torch.Tensor] = []

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(t)
        return t * self.masks[len(self.inputs) - 1]


def test_dropout_is_applied_at_the_authors_three_positions():
    """``drop(act(D M drop(act(E drop(x)))))``: on the input, on the encoder's activation and on the
    decoder's activation (the old forward applied it to the input only)."""
    model = adapted(dtype=torch.float64, lora_dropout=0.5)
    gen = torch.Generator().manual_seed(1)
    for layer in mixture_layers(model).values():
        x = torch.randn(2, 3, layer.in_features, generator=gen, dtype=torch.float64)
        shapes = [(2, 3, layer.in_features), (2, 3, 4), (2, 3, layer.out_features)]
        masks = [(torch.rand(shape, generator=gen, dtype=torch.float64) > 0.5) * 2.0 for shape in shapes]
        spy = FixedMasks(masks)
        layer.adapter_dropout["default"] = spy
        out = layer(x)
        assert [tuple(t.shape) for t in spy.inputs] == shapes
        torch.testing.assert_close(out, naive.denselora(layer, x, masks=tuple(masks)), rtol=1e-12, atol=1e-12)


def test_training_mode_dropout_matches_three_independent_masks():
    """With the real ``nn.Dropout(p)`` in training mode: the same seed draws the same three masks, in the
    order input, encoder activation, decoder activation."""
    p = 0.5
    model = adapted(dtype=torch.float64, lora_dropout=p)
    model.train()
    gen = torch.Generator().manual_seed(2)
    for layer in mixture_layers(model).values():
        x = torch.randn(2, 3, layer.in_features, generator=gen, dtype=torch.float64)
        torch.manual_seed(7)
        out = layer(x)
        torch.manual_seed(7)
        shapes = [(2, 3, layer.in_features), (2, 3, 4), (2, 3, layer.out_features)]
        masks = tuple(F.dropout(torch.ones(shape, dtype=torch.float64), p, training=True) for shape in shapes)
        assert all(((m == 0) | (m == 1 / (1 - p))).all() and (m == 0).any() for m in masks)
        torch.testing.assert_close(out, naive.denselora(layer, x, masks=masks), rtol=1e-12, atol=1e-12)
        model.eval()
        torch.testing.assert_close(layer(x), naive.denselora(layer, x), rtol=1e-12, atol=1e-12)
        model.train()


def test_encoder_and_decoder_are_shared_across_layers():
    model = adapted()
    layers = mixture_layers(model)
    by_kind: dict[str, list] = {}
    for name, layer in layers.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(layer.shared.get("default", layer.kind))
    assert set(by_kind) == set(TARGETS)
    for pairs in by_kind.values():
        assert len(pairs) == 2  # two decoder layers
        assert pairs[0][0] is pairs[1][0] and pairs[0][1] is pairs[1][1]
    ms = [layer.denselora_M["default"] for layer in layers.values()]
    assert len({id(m) for m in ms}) == len(ms)  # one dense matrix per module


def test_shared_tensors_train_and_are_counted_once():
    model = adapted(randomize=False)
    layers = mixture_layers(model).values()
    kinds = {layer.kind: (layer.in_features, layer.out_features) for layer in layers}
    expected = sum(4 * (i + o) for i, o in kinds.values()) + 16 * len(layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    model.train()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    decoder = model.base_model.denselora_decoder["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.values())


def test_gpt2_same_name_different_shapes_get_separate_pairs():
    model = adapted("gpt2", target_modules=None)
    kinds = {layer.kind for layer in mixture_layers(model).values()}
    assert kinds == {"c_attn_32x96", "c_proj_32x32", "c_proj_128x32"}


def test_cannot_merge():
    model = adapted()
    with pytest.raises(ValueError, match="non-linear"):
        model.merge_and_unload()


def test_invalid_activation_raises():
    with pytest.raises(ValueError, match="activation"):
        build_config("denselora", activation="tanh")
