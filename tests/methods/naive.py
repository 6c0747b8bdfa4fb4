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


def sparsemoa_gates(block, u: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Cao et al. 2025 (MoA), Sparse MoA: gates ``(E,)`` of one token from the block's router input ``u (d,)``.

    ``p = sigmoid(W_3 (silu(W_1 u + b_1) * (W_2 u + b_2)) + b_3)`` (or ``sigmoid(W u + b)`` for a linear
    router), ``tau = tau_max sigmoid(w . u + b)``, ``g_e = p_e if p_e >= tau else 0`` (``g = p`` for Soft MoA).
    """
    cfg = block.adapter_config[name]
    down = block.sparsemoa_router_down[name]
    if cfg.router_hidden_factor:
        gate, up = block.sparsemoa_router_gate[name], block.sparsemoa_router_up[name]
        hidden = [
            torch.nn.functional.silu(gate.weight[j] @ u + gate.bias[j]) * (up.weight[j] @ u + up.bias[j])
            for j in range(gate.weight.shape[0])
        ]
        logits = [
            sum(down.weight[e, j] * hidden[j] for j in range(len(hidden))) + down.bias[e]
            for e in range(len(down.bias))
        ]
    else:
        logits = [down.weight[e] @ u + down.bias[e] for e in range(len(down.bias))]
    p = [1 / (1 + torch.exp(-logit)) for logit in logits]
    if not cfg.sparse:
        return torch.stack(p)
    threshold = block.sparsemoa_threshold[name]
    tau = cfg.max_threshold / (1 + torch.exp(-(threshold.weight[0] @ u + threshold.bias[0])))
    return torch.stack([p_e if p_e >= tau else torch.zeros_like(p_e) for p_e in p])


def sparsemoa_expert(layer: MixtureLayer, x: torch.Tensor, gates: torch.Tensor, name: str = "default"):
    """One LoRA expert of Sparse MoA, token by token: ``W x + g_e (alpha / r) B A x``.

    ``x`` is ``(N, d_in)``, ``gates`` the ``(N, E)`` gates of the tokens (from :func:`sparsemoa_gates`).
    """
    A, B = layer.sparsemoa_A[name].weight, layer.sparsemoa_B[name].weight
    cfg = layer.adapter_config[name]
    e = layer.gate_index[name]
    rows = [gates[n, e] * cfg.lora_alpha / cfg.r * (B @ (A @ token)) for n, token in enumerate(x)]
    return layer.get_base_layer()(x) + torch.stack(rows)


def sparsemoa_parallel_adapter(block, v: torch.Tensor, gates: torch.Tensor, name: str = "default"):
    """The parallel-adapter expert, token by token: ``g_E (U silu(D v + d) + u_b)``; ``v (N, d)``."""
    down, up = block.sparsemoa_adapter_down[name], block.sparsemoa_adapter_up[name]
    rows = [
        gates[n, -1] * (up.weight @ torch.nn.functional.silu(down.weight @ token + down.bias) + up.bias)
        for n, token in enumerate(v)
    ]
    return torch.stack(rows)


def flylora(layer: MixtureLayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """Zou et al. 2025 (FlyLoRA), as in the authors' code: ``y = A x`` with ``A`` frozen; the ``k`` ranks
    with the largest ``y_i + b_i`` (``selection="signed"``, the authors' experiment code) or ``|y_i + b_i|``
    (``"magnitude"``, their minimal reference) pass the unbiased ``y_i`` on:
    ``h = W x + (alpha / r) sum_{i in S} B[:, i] y_i``."""
    cfg = layer.adapter_config[name]
    A, B, b = layer.flylora_A[name], layer.flylora_B[name].weight, layer.flylora_bias[name]

    def delta(token):
        y = A @ token
        scores = [float(y[i]) + float(b[i]) for i in range(cfg.r)]
        if cfg.selection == "magnitude":
            scores = [abs(score) for score in scores]
        chosen = sorted(range(cfg.r), key=lambda i: -scores[i])[: cfg.top_k]
        return cfg.lora_alpha / cfg.r * sum(B[:, i] * y[i] for i in chosen)

    return _per_token(layer, x, delta)


def denselora(
    layer: MixtureLayer,
    x: torch.Tensor,
    name: str = "default",
    masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mu et al. 2025 (DenseLoRA), as in the authors' forward: with ``E``, ``D`` shared by the module's kind,
    ``h = W x + (alpha / r) drop(act(D M drop(act(E drop(x)))))``, ``act`` the configured activation.

    ``masks``: the three dropout masks (already scaled by ``1 / (1 - p)``), of shapes ``(..., d_in)``,
    ``(..., r)`` and ``(..., d_out)`` with ``x``'s leading dimensions; None for no dropout (eval, ``p = 0``).
    """
    cfg = layer.adapter_config[name]
    E, D = layer.shared.get(name, layer.kind)
    M = layer.denselora_M[name]
    act = {
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "relu": torch.nn.functional.relu,
        "identity": lambda t: t,
    }[cfg.activation]
    tokens = x.reshape(-1, x.shape[-1])
    rows = []
    for n, token in enumerate(tokens):
        m_x, m_z, m_out = (
            (None, None, None) if masks is None else (m.reshape(len(tokens), -1)[n] for m in masks)
        )
        x_in = token if m_x is None else token * m_x
        z = act(E @ x_in)
        z = z if m_z is None else z * m_z
        out = act(D @ (M @ z))
        out = out if m_out is None else out * m_out
        rows.append(cfg.lora_alpha / cfg.r * out)
    return layer.get_base_layer()(x) + torch.stack(rows).reshape(*x.shape[:-1], -1)
