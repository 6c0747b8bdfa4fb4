"""``routing.load_balancing_loss`` against the Switch Transformer formula, written out with loops in float64."""

from __future__ import annotations

import pytest
import torch

from comol.mixture import routing


def switch_loss_naive(probs: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Fedus et al. (2021), Eq. 4-6: ``E * sum_e f_e P_e`` over the real tokens.

    ``f_e``: share of tokens dispatched to expert ``e`` (non-zero gate; with soft routing, where every gate
    is non-zero, the token's arg-max). ``P_e``: mean router probability of ``e``.
    """
    n, num_experts = probs.shape
    tokens = [i for i in range(n) if mask is None or bool(mask[i])]
    soft = all(float(gates[i, e]) > 0 for i in range(n) for e in range(num_experts))
    loss = 0.0
    for e in range(num_experts):
        dispatched = 0.0
        prob_sum = 0.0
        for i in tokens:
            if soft:
                best = max(range(num_experts), key=lambda j: (float(gates[i, j]), -j))
                dispatched += 1.0 if best == e else 0.0
            else:
                dispatched += 1.0 if float(gates[i, e]) > 0 else 0.0
            prob_sum += float(probs[i, e])
        count = max(len(tokens), 1)
        loss += (dispatched / count) * (prob_sum / count)
    return num_experts * loss


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_switch_formula(top_k: int | None, masked: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 7, 5, generator=gen, dtype=torch.float64) * 2, dim=-1)
    gates = probs if top_k is None else routing.top_k_gates(probs, top_k)
    mask = torch.rand(3, 7, generator=gen) > 0.3 if masked else None
    flat_mask = None if mask is None else mask.reshape(-1)
    expected = switch_loss_naive(probs.reshape(-1, 5), gates.reshape(-1, 5), flat_mask)
    loss = routing.load_balancing_loss(probs, gates, mask)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_load_balancing_loss_gradient_flows_through_probs_only() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, dim=-1)
    routing.load_balancing_loss(probs, probs).backward()
    # d/dP_e of E * sum_e f_e P_e is E * f_e (f detached): check through the softmax's Jacobian
    frac = torch.nn.functional.one_hot(probs.detach().argmax(-1), 4).double().mean(0)
    fresh = torch.softmax(logits, dim=-1)
    expected = torch.autograd.grad((4 * frac * fresh.mean(0)).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("tokens", [3, 255, 256, 1000])
@pytest.mark.parametrize("num_experts", [4, 15, 16, 64])
def test_softmax_f32_either_axis_and_layout_matches_the_plain_softmax(tokens: int, num_experts: int) -> None:
    """Few experts and many tokens take the token-axis softmax on CPU; the values are the same either way."""
    logits = torch.randn(tokens, num_experts, dtype=torch.bfloat16)
    probs = routing.softmax_f32(logits)
    assert probs.dtype == torch.float32
    assert routing.few_experts_on_cpu(logits.float()) == (num_experts < 16 and tokens >= 256)
    torch.testing.assert_close(probs, torch.softmax(logits.float(), dim=-1), rtol=1e-6, atol=1e-7)
    assert routing.softmax_f32(logits.double()).dtype == torch.float64
    # stored tokens last (a transposed view of (E, N), as the fused branch keeps logits): taken over the transpose
    stored_tokens_last = logits.t().contiguous().t()
    probs_t = routing.softmax_f32(stored_tokens_last)
    torch.testing.assert_close(probs_t, probs, rtol=1e-6, atol=1e-7)
    assert routing.softmax_over_transpose(stored_tokens_last) and probs_t.t().is_contiguous()
