"""FlyLoRA's own cases: frozen sparse random A (N(0, 1/r^2) values, d_in // (r // k) non-zeros per row),
exactly k ranks per token chosen on y + b, the balancing bias, and the authors' formula on random weights in
float64."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from comol.methods import build_config
from comol.methods.flylora import nonzeros_per_row, sparse_random_projection
from comol.mixture import mixture_layers, register_step_hooks

import naive
from cases import adapted as shared_adapted
from conftest import VOCAB, tiny_model


def adapted(family: str = "llama", **kwargs):
    return shared_adapted("flylora", family, **{"r": 8, "lora_alpha": 16, "top_k": 3, **kwargs})


@pytest.mark.parametrize("selection", ["signed", "magnitude"])
def test_matches_the_authors_formula_in_float64(selection):
    model = adapted(dtype=torch.float64, selection=selection)
    gen = torch.Generator().manual_seed(3)
    for layer in mixture_layers(model).values():
        y_scale = layer.flylora_A["default"].abs().max()  # a bias of the scale of y, so that it matters
        bias = torch.randn(8, generator=gen, dtype=torch.float64) * y_scale
        layer.flylora_bias["default"].copy_(bias)
        x = torch.randn(2, 5, layer.in_features, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(x), naive.flylora(layer, x), rtol=1e-12, atol=1e-12)


def test_sparse_random_projection_has_the_requested_non_zeros():
    a = sparse_random_projection(6, 40, nnz=10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 40)
    assert ((a != 0).sum(-1) == 10).all()


@pytest.mark.parametrize(("r", "nnz"), [(32, 256), (8, 1024)])
def test_a_values_are_normal_with_std_one_over_r(r, nnz):
    """The paper and the authors' code draw the non-zeros of A from N(0, 1/r^2), not N(0, 1/nnz)."""
    a = sparse_random_projection(r, 4096, nnz=nnz, generator=torch.Generator().manual_seed(0))
    values = a[a != 0]
    assert values.numel() == r * nnz
    assert abs(values.mean().item()) < 0.05 / r
    assert values.std().item() == pytest.approx(1 / r, rel=0.03)  # 1/sqrt(nnz) = 1/16 and 1/32 here


def test_a_drawn_by_the_layer_has_std_one_over_r():
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(1024, 16)),
        build_config("flylora", r=8, lora_alpha=8, top_k=2, target_modules=["0"]),
    )
    a = next(iter(mixture_layers(model).values())).flylora_A["default"]
    values = a[a != 0]
    assert values.numel() == 8 * 256  # d_in // (r // k) = 1024 // 4 per row
    assert values.std().item() == pytest.approx(1 / 8, rel=0.06)  # N(0, 1/nnz) would give 1/16


@pytest.mark.parametrize(
    ("r", "top_k", "density", "expected"),
    [(32, 8, None, 1024), (8, 4, None, 2048), (8, 3, None, 2048), (16, 16, None, 4096), (32, 8, 0.1, 410)],
)
def test_non_zeros_per_row_default_to_the_authors_rule(r, top_k, density, expected):
    """``p = d_in // (r // k)`` (``weight.size(1) // (r // top_k)`` in the authors' code) unless a density
    is given; the old default (density 0.25) gave 1024 non-zeros whatever r and k."""
    assert nonzeros_per_row(4096, r, top_k, density) == expected


def test_layer_a_has_the_default_non_zeros():
    model = adapted(r=8, top_k=4, randomize=False)  # tiny model: d_in = 32 (q/k/v/o), 64 (down)
    for layer in mixture_layers(model).values():
        a = layer.flylora_A["default"]
        assert ((a != 0).sum(-1) == layer.in_features // 2).all()
    model = adapted(r=8, top_k=4, a_density=0.25, randomize=False)
    for layer in mixture_layers(model).values():
        a = layer.flylora_A["default"]
        assert ((a != 0).sum(-1) == round(0.25 * layer.in_features)).all()


def _selected(selection: str, y: list[float], bias: list[float], top_k: int = 2) -> set[int]:
    model = adapted(r=4, top_k=top_k, selection=selection, randomize=False)
    layer = next(iter(mixture_layers(model).values()))
    layer.flylora_bias["default"].copy_(torch.tensor(bias))
    mask = layer.select_ranks("default", torch.tensor([y]))
    return set(mask[0].nonzero().flatten().tolist())


def test_signed_selection_takes_the_largest_y_plus_b():
    """The authors' experiment code: ``torch.topk(activations + bias, top_k)``, on signed activations."""
    y = [-5.0, 1.0, 2.0, 0.5]
    assert _selected("signed", y, [0.0, 0.0, 0.0, 0.0]) == {1, 2}  # |y| would take rank 0
    assert _selected("signed", y, [0.0, 0.0, 0.0, 3.0]) == {2, 3}  # |y| + b would take {0, 3}
    assert _selected("signed", y, [6.5, 0.0, 0.0, 0.0]) == {0, 2}  # the bias can lift a negative rank


def test_magnitude_selection_takes_the_largest_abs_of_y_plus_b():
    """FlyLoRA's minimal reference: ``torch.topk((y + d).abs(), k)``."""
    y = [-5.0, 1.0, 2.0, 0.5]
    assert _selected("magnitude", y, [0.0, 0.0, 0.0, 0.0]) == {0, 2}
    assert _selected("magnitude", y, [4.5, 0.0, 0.0, 0.0]) == {1, 2}  # |y| + b would take {0, 2}


def test_selected_ranks_pass_on_the_unbiased_signed_y():
    model = adapted(r=4, top_k=2, randomize=False, dtype=torch.float64)
    layer = next(iter(mixture_layers(model).values()))
    with torch.no_grad():
        layer.flylora_B["default"].weight.copy_(torch.eye(layer.out_features, 4, dtype=torch.float64))
        layer.flylora_bias["default"].copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    y = x @ layer.flylora_A["default"].T  # (3, 4)
    delta = (layer(x) - layer.get_base_layer()(x))[:, :4] / layer.scaling["default"]
    best = (y[:, :3]).argmax(-1)  # rank 3 always (bias 100), plus the largest signed y among 0..2
    expected = torch.zeros_like(y)
    expected[:, 3] = y[:, 3]
    expected[torch.arange(3), best] = y[torch.arange(3), best]
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)


def test_a_is_frozen_unchanged_by_training_and_restored_on_reload(tmp_path):
    model = adapted()
    model.train()
    layer = next(iter(mixture_layers(model).values()))
    a_before = layer.flylora_A["default"].clone()
    assert not any("flylora_A" in name for name, _ in model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(".flylora_B." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    b_before = layer.flylora_B["default"].weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(layer.flylora_B["default"].weight, b_before)
    assert torch.equal(layer.flylora_A["default"], a_before)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a fresh model would draw a different A: the saved one must win
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    reloaded_layer = next(iter(mixture_layers(reloaded).values()))
    assert torch.equal(reloaded_layer.flylora_A["default"], a_before)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_exactly_k_ranks_per_token():
    model = adapted(top_k=3)
    seen = []
    for layer in mixture_layers(model).values():
        layer.register_gate_hook(lambda _l, _n, probs, gates, mask: seen.append(gates))
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0)))
    assert len(seen) == len(mixture_layers(model))
    for gates in seen:
        assert ((gates > 0).sum(-1) == 3).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0]))


def test_inactive_ranks_get_no_gradient():
    model = adapted(top_k=1)
    layer = next(iter(mixture_layers(model).values()))
    x = torch.randn(1, layer.in_features, requires_grad=False)
    layer(x).sum().backward()
    grad = layer.flylora_B["default"].weight.grad  # (d_out, r)
    assert (grad.abs().sum(0) > 0).sum() == 1


def test_bias_update_is_the_documented_sign_rule():
    model = adapted(bias_update_rate=0.5)
    model.train()
    layer = next(iter(mixture_layers(model).values()))
    x = torch.randn(4, 9, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = layer.select_ranks("default", x @ layer.flylora_A["default"].T)
        layer(x)
    counts = mask.reshape(-1, 8).sum(0)
    layer.update_bias("default")
    torch.testing.assert_close(layer.flylora_bias["default"], 0.5 * torch.sign(counts.mean() - counts))
    layer.update_bias("default")  # nothing counted since: no change
    torch.testing.assert_close(layer.flylora_bias["default"], 0.5 * torch.sign(counts.mean() - counts))


def test_bias_moves_the_load_towards_balance_during_training():
    torch.manual_seed(0)
    model = adapted(r=8, top_k=2, bias_update_rate=0.05)
    model.train()
    layer = next(iter(mixture_layers(model).values()))
    with torch.no_grad():  # one rank that every (positive) token would pick: maximal imbalance
        layer.flylora_A["default"][0] = layer.flylora_A["default"][0].abs() * 3
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(1)).abs()

    def load() -> torch.Tensor:
        with torch.no_grad():
            return layer.select_ranks("default", x @ layer.flylora_A["default"].T).sum(0)

    start = load()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    register_step_hooks(optimizer, model)
    for _ in range(60):
        with torch.no_grad():
            layer(x)
        optimizer.step()
    end = load()
    assert start[0] == 64 and end[0] < 64
    assert (end.max() - end.min()) < (start.max() - start.min())
    assert layer.flylora_bias["default"][0] < 0


def test_no_bias_update_in_eval_mode():
    model = adapted()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 5)))
    for layer in mixture_layers(model).values():
        layer.update_bias("default")
        assert not layer.flylora_bias["default"].any()


def test_k_equal_r_is_plain_lora_and_merges():
    model = adapted(top_k=8, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_trainable_parameters_are_b_only():
    model = adapted(randomize=False)
    expected = sum(layer.out_features * 8 for layer in mixture_layers(model).values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize(
    "bad",
    [{"top_k": 9}, {"top_k": 0}, {"a_density": 0.0}, {"bias_update_rate": -1.0}, {"selection": "abs"}],
)
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        build_config("flylora", **{"r": 8, **bad})
