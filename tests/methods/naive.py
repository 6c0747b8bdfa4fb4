"""Naive references written from each method's paper: Python loops over tokens and experts, no batching.

Each function takes a layer (for its weights) and ``x (..., d_in)`` and returns the full output
``W x + delta(x)`` of the layer, computed token by token (example by example for SMEAR).
"""

from __future__ import annotations

import torch

from comol.mixture import MixtureLayer


def _weights(layer: MixtureLayer, name: str):
    prefix = layer.prefix
    A = getattr(layer, prefix + "A")[name]
    B = getattr(layer, prefix + "B")[name]
    Wg = getattr(layer, prefix + "router")[name].weight  # (E, d_in)
    config = layer.adapter_config[name]
    return A, B, Wg, config.lora_alpha / config.r


def _per_token(layer: MixtureLayer, x: torch.Tensor, delta) -> torch.Tensor:
    rows = [delta(token) for token in x.reshape(-1, x.shape[-1])]
    return layer.get_base_layer()(x) + torch.stack(rows).reshape(*x.shape[:-1], -1)


def comol(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """This paper, Eq. 12 and 14-15: ``h = W x + s sum_i g_i B M_i A x``, with ``g = softmax(W_g A x)``
    (core-space routing) or ``softmax(W_g x)`` (w/o CR); top-k keeps the k largest gates, renormalised."""
    cfg = layer.adapter_config[name]
    A, B = layer.comol_A[name].weight, layer.comol_B[name].weight  # (r, d_in), (d_out, r)
    M, Wg = layer.comol_cores[name], layer.comol_router[name].weight  # (E, r, r), (E, r or d_in)

    def delta(token):
        x_hat = A @ token
        g = torch.softmax(Wg @ (x_hat if cfg.core_router else token), dim=-1)
        if cfg.router_top_k is not None:
            keep = g.topk(cfg.router_top_k).indices
            g = torch.zeros_like(g).index_copy(0, keep, g[keep] / g[keep].sum())
        return cfg.lora_alpha / cfg.r * sum(g[i] * (B @ M[i] @ A @ token) for i in range(M.shape[0]))

    return _per_token(layer, x, delta)


def molora(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Zadouri et al. 2023: ``h = W x + s sum_i g_i B_i A_i x``, ``g = softmax(W_g x)``."""
    A, B, Wg, s = _weights(layer, name)

    def delta(token):
        g = torch.softmax(Wg @ token, dim=-1)
        return s * sum(g[i] * (B[i] @ (A[i] @ token)) for i in range(len(g)))

    return _per_token(layer, x, delta)


def hydralora(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Tian et al. 2024: ``h = W x + s sum_i g_i B_i A x`` with one shared ``A``."""
    A, B, Wg, s = _weights(layer, name)

    def delta(token):
        g = torch.softmax(Wg @ token, dim=-1)
        return s * sum(g[i] * (B[i] @ (A @ token)) for i in range(len(g)))

    return _per_token(layer, x, delta)


def mola(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Gao et al. 2024: top-k of ``softmax(W_g x)``, renormalised over the k kept experts."""
    A, B, Wg, s = _weights(layer, name)
    k = layer.adapter_config[name].router_top_k

    def delta(token):
        p = torch.softmax(Wg @ token, dim=-1)
        kept = p.topk(k).indices.tolist()
        total = sum(p[i] for i in kept)
        return s * sum(p[i] / total * (B[i] @ (A[i] @ token)) for i in kept)

    return _per_token(layer, x, delta)


def adamole(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Liu and Luo 2024: experts with ``p_i >= tau(x) = tau_max sigmoid(w x + b)``, weights ``p_i - tau``."""
    A, B, Wg, s = _weights(layer, name)
    threshold = layer.adamole_threshold[name]
    tau_max = layer.adapter_config[name].max_threshold or 1.0 / Wg.shape[0]

    def delta(token):
        p = torch.softmax(Wg @ token, dim=-1)
        tau = tau_max * torch.sigmoid(threshold.weight[0] @ token + threshold.bias[0])
        active = [i for i in range(len(p)) if p[i] > tau]
        if not active:  # possible only with tau_max > 1 / E: the token gets no update
            return torch.zeros(B.shape[1], dtype=token.dtype)
        total = sum(p[i] - tau for i in active)
        return s * sum((p[i] - tau) / total * (B[i] @ (A[i] @ token)) for i in active)

    return _per_token(layer, x, delta)


def smear(layer: MixtureLayer, x: torch.Tensor, mask: torch.Tensor | None = None, name: str = "default"):
    """Muqeeth et al. 2024 / CoMoL paper Eq. 6-8: route each example on the mean of its real tokens,
    merge ``A`` and ``B`` with those gates, apply the merged LoRA to every token.

    ``x`` is ``(T, d_in)`` (one example) or ``(B, T, d_in)``; ``mask`` ``(B, T)``.
    """
    A, B, Wg, s = _weights(layer, name)
    examples = x.reshape(-1, *x.shape[-2:])
    masks = (
        torch.ones(examples.shape[:2], dtype=torch.bool) if mask is None else mask.reshape(-1, x.shape[-2])
    )
    out = []
    for tokens, keep in zip(examples, masks, strict=True):
        real = [t for t, m in zip(tokens, keep, strict=True) if m]
        x_hat = sum(real) / len(real)
        g = torch.softmax(Wg @ x_hat, dim=-1)
        A_ins = sum(g[i] * A[i] for i in range(len(g)))
        B_ins = sum(g[i] * B[i] for i in range(len(g)))
        out.append(torch.stack([s * (B_ins @ (A_ins @ t)) for t in tokens]))
    return layer.get_base_layer()(x) + torch.stack(out).reshape(*x.shape[:-1], -1)
