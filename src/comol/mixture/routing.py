"""Routing: how gates ``g`` over experts are computed from router ``logits``.

Notation: ``N`` tokens (any leading dimensions flattened), ``E`` experts. ``logits`` are the router's raw
scores; ``probs`` their softmax, always computed in float32 (or float64); ``gates`` the weights the experts are actually
combined with (``probs`` for soft routing, a sparsified and renormalised version for top-k).

Every function accepts any leading dimensions ``(..., E)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_WIDE = (torch.float32, torch.float64)  # dtypes the softmax keeps


def softmax_f32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in at least float32 (bf16/fp16 logits are upcast; float64 stays).

    Args:
        logits: ``(..., E)``.

    Returns:
        probs ``(..., E)`` in float32 (float64 for float64 logits), summing to 1 over ``E``: a transposed view
        where it is computed over the transpose (:func:`softmax_over_transpose`).
    """
    if logits.dtype not in _WIDE:
        logits = logits.float()
    if softmax_over_transpose(logits):  # same maths, reduced along a leading dimension
        return torch.softmax(logits.movedim(-1, 0), dim=0).movedim(0, -1)
    return torch.softmax(logits, dim=-1)


def softmax_over_transpose(t: torch.Tensor) -> bool:
    """Whether the softmax of ``t (..., E)`` over ``E`` (or its backward, for probabilities ``t``) is taken over the
    first dimension of the transpose: where ``t (N, E)`` is stored tokens last (a transposed view of an ``(E, N)``
    tensor, as :mod:`comol.kernels.fused` keeps it), or for few experts on CPU (:func:`few_experts_on_cpu`). The
    softmax of those returns such a view, so that its backward takes the same way."""
    return (t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()) or few_experts_on_cpu(t)


_MANY_TOKENS = 256  # below this, the transposed softmax's two extra views cost more than they save


def few_experts_on_cpu(logits: torch.Tensor) -> bool:
    """Whether to take the softmax of ``logits (..., E)`` over a leading dimension (the result is a view).

    PyTorch's CPU softmax vectorises along the reduced dimension: with fewer experts than a vector register
    holds, it is several times slower over the last dimension of ``(N, E)`` than over the first dimension of
    its transpose. For a few tokens (decoding) the plain softmax is cheaper.
    """
    return (
        logits.numel() >= _MANY_TOKENS * logits.shape[-1]  # first: decoding stops here
        and logits.shape[-1] < 16
        and logits.dim() > 1
        and logits.device.type == "cpu"
    )


def top_k_gates(probs: torch.Tensor, k: int, renormalize: bool = True) -> torch.Tensor:
    """Keep the ``k`` largest probabilities per token, zero the rest.

    Args:
        probs: ``(..., E)``.
        k: experts kept per token, ``1 <= k <= E``.
        renormalize: rescale the kept gates to sum to 1.

    Returns:
        gates ``(..., E)`` with exactly ``k`` non-zero entries per token (ties broken by index).
    """
    if k >= probs.shape[-1]:
        return probs
    values, index = probs.topk(k, dim=-1)  # (..., k)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return torch.zeros_like(probs).scatter(-1, index, values)


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's gate distribution.

    Args:
        gates: ``(..., E)``, non-negative and summing to 1.

    Returns:
        ``(...)`` entropies in at least float32, 0 for a one-hot gate and ``log E`` for a uniform one.
    """
    gates = gates.to(torch.promote_types(gates.dtype, torch.float32))
    return -(gates * torch.log(gates.clamp_min(1e-30))).sum(dim=-1)


def load_balancing_loss(
    probs: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens dispatched to expert ``e`` (its gate is non-zero after top-k, or it
    is the arg-max for soft routing) and ``P_e`` the mean router probability of ``e``. Minimal (= 1) when
    both are uniform. Only ``P`` carries gradient.

    Args:
        probs: ``(..., E)`` float32 router probabilities.
        gates: ``(..., E)`` gates used to combine experts.
        mask: optional ``(...)`` bool, False for padding tokens that must not count.

    Returns:
        A scalar tensor.
    """
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts)
    gates = gates.reshape(-1, num_experts)
    # Soft routing (every token has a gate on every expert) counts each token's arg-max; sparse routing
    # counts the experts with a non-zero gate. Chosen on the device, without a host-device sync.
    nonzero = gates > 0  # (N, E)
    arg_max = F.one_hot(gates.argmax(-1), num_experts).bool()  # (N, E)
    dispatched = torch.where(nonzero.all(), arg_max, nonzero).to(probs.dtype)  # (N, E)
    if mask is not None:
        weight = mask.reshape(-1, 1).to(probs.dtype)
        denom = weight.sum().clamp_min(1.0)
        frac = (dispatched * weight).sum(0) / denom  # (E,)
        mean_prob = (probs * weight).sum(0) / denom  # (E,)
    else:
        frac = dispatched.mean(0)
        mean_prob = probs.mean(0)
    return num_experts * (frac.detach() * mean_prob).sum()
