"""Triton kernels of the routed core mix (router logits, float32 softmax, core mixing), and their launchers.

Notation: ``N`` tokens, ``k`` router input width (``r`` or ``d_in``), ``E`` experts, ``r`` rank; ``u`` is the
router input, ``W_g (E, k)`` the router weight, ``M_e = cores[e]`` laid out ``[out, in]``.

Kernels (each program handles ``BLOCK_N`` tokens unless said otherwise):

- ``_forward``: ``logits = u W_g^T`` (loop over ``k``), ``probs = softmax`` in float32, then
  ``m = sum_e g_e (z M_e^T)``, one ``(BLOCK_N, r) x (r, r)`` product per expert, so neither a per-token
  ``r x r`` matrix nor an ``(N, E, r)`` tensor reaches global memory and the registers held do not grow
  with ``E``;
- ``_backward_tokens``: recomputes ``probs``; from ``dm`` produces the mixing part of ``dL/dz (N, r)``,
  ``dL/dlogits (N, E)`` and the gates ``(N, E)`` for the next kernel;
- ``_core_grad``: grid ``(E, S)``; program ``(e, s)`` sums ``(g_e dm)^T z`` over the token blocks
  ``s, s + S, ...`` in registers, then either adds its partial to ``dL/dcores`` with one atomic per element
  (``S``-way contention instead of one per token block) or, in deterministic mode, writes it to
  ``partials (S, E, r, r)``, summed afterwards in a fixed order.

The router's two matmuls in backward (``dL/du = dlogits W_g``, ``dL/dW_g = dlogits^T u``) are left to
cuBLAS.

Dtypes (the rule of autocast, which is what the eager path follows under the same inputs): every matmul
takes its operands in ``z``'s dtype (the *compute dtype*; under autocast the router weight, the cores and an
fp32 router input are cast to it in the kernel) and accumulates in float32; the softmax and its backward are
float32; ``mixed`` and each gradient come back in the dtype of the tensor they belong to. A float32 ``z``
uses IEEE float32 products (no TF32), like PyTorch's default.

Sizes are padded to powers of two (at least 16, the smallest ``tl.dot``) with masked loads. The kernels
also run on CPU tensors under ``TRITON_INTERPRET=1`` (slowly), which is how the tests check them without a
GPU; ``tests/kernels/test_triton_aot.py`` compiles them ahead of time for sm_80 and sm_90.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Compile-time sizes of one launch (each distinct value is one compiled specialisation)."""

    BLOCK_N: int  # tokens per program
    BLOCK_K: int  # router input columns per step of the logits loop
    E_P: int  # experts, padded
    R_P: int  # rank, padded
    num_warps: int
    core_splits: int  # S: programs per expert in _core_grad

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K, "E_P": self.E_P, "R_P": self.R_P}


def launch_config(n: int, k: int, num_experts: int, r: int, dtype: torch.dtype) -> LaunchConfig:
    """Block sizes for ``n`` tokens, router width ``k``, ``num_experts`` experts, rank ``r``, compute ``dtype``.

    ``BLOCK_N * max(E, r)`` (padded) is kept at 4096 for 16-bit and 2048 for float32 compute, 64 tokens at
    most, and 8 warps once ``E`` or ``r`` reaches 64: with more, the kernels spill registers there
    (``ptxas`` for sm_80 and sm_90, ``tests/kernels/test_triton_aot.py``). ``S`` gives ``E * S`` about 256
    programs for the core gradient (a few per SM), never more than there are token blocks.
    """
    e_p, r_p = _pow2(num_experts), _pow2(r)
    tile = 2048 if dtype == torch.float32 else 4096
    block_n = max(16, min(64, tile // max(e_p, r_p)))
    num_warps = 8 if max(e_p, r_p) >= 64 else 4
    blocks = -(-max(n, 1) // block_n)
    splits = max(1, min(blocks, -(-256 // num_experts)))
    return LaunchConfig(block_n, min(64, _pow2(k)), e_p, r_p, num_warps, splits)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for compute dtype ``dtype`` (only float32 operands read it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               E_P: tl.constexpr, CD: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """``softmax_f32(u W_g^T)`` for ``rows``: ``(BLOCK_N, E_P)`` float32, 0 on padded experts."""
        es = tl.arange(0, E_P)
        e_ok = es < E
        acc = tl.zeros((BLOCK_N, E_P), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            u = tl.load(
                u_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )  # (BLOCK_N, BLOCK_K)
            w = tl.load(w_ptr + es[None, :] * K + ks[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.dot(u.to(CD), w.to(CD), input_precision=PRECISION)  # (BLOCK_N, E_P)
        logits = tl.where(e_ok[None, :], acc, float("-inf"))
        ex = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        return ex / tl.sum(ex, axis=1)[:, None]

    @triton.jit
    def _forward(z_ptr, u_ptr, w_ptr, c_ptr, m_ptr, p_ptr, N, K, E, R, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        CD: tl.constexpr = z_ptr.dtype.element_ty
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: rows * K
        row_ok = rows < N
        es = tl.arange(0, E_P)
        rs = tl.arange(0, R_P)
        tok_mask = row_ok[:, None] & (rs[None, :] < R)
        probs = _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N, BLOCK_K, E_P, CD, PRECISION)
        tl.store(p_ptr + rows[:, None] * E + es[None, :], probs, mask=row_ok[:, None] & (es[None, :] < E))
        gates = probs.to(CD).to(tl.float32)  # the eager path mixes with gates in z's dtype
        z = tl.load(z_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)  # (BLOCK_N, R_P)
        core_mask = (rs[:, None] < R) & (rs[None, :] < R)
        acc = tl.zeros((BLOCK_N, R_P), dtype=tl.float32)
        for e in range(0, E):
            g = tl.sum(tl.where(es[None, :] == e, gates, 0.0), axis=1)  # (BLOCK_N,)
            core_t = tl.load(c_ptr + e * R * R + rs[None, :] * R + rs[:, None], mask=core_mask, other=0.0)
            # core_t[i, o] = M_e[o, i]; (BLOCK_N, R_P): z M_e^T, weighted by the gate
            acc += g[:, None] * tl.dot(z, core_t.to(CD), input_precision=PRECISION)
        tl.store(m_ptr + rows[:, None] * R + rs[None, :], acc.to(m_ptr.dtype.element_ty), mask=tok_mask)

    @triton.jit
    def _backward_tokens(z_ptr, u_ptr, w_ptr, c_ptr, dm_ptr, dz_ptr, dl_ptr, g_ptr, N, K, E, R,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr,
                         PRECISION: tl.constexpr):  # fmt: skip
        CD: tl.constexpr = z_ptr.dtype.element_ty
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: rows * K
        row_ok = rows < N
        es = tl.arange(0, E_P)
        rs = tl.arange(0, R_P)
        tok_mask = row_ok[:, None] & (rs[None, :] < R)
        exp_mask = row_ok[:, None] & (es[None, :] < E)
        probs = _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N, BLOCK_K, E_P, CD, PRECISION)
        gates = probs.to(CD)
        tl.store(g_ptr + rows[:, None] * E + es[None, :], gates, mask=exp_mask)
        gates = gates.to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0).to(tl.float32)
        dm = tl.load(dm_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)  # (BLOCK_N, R_P)
        core_mask = (rs[:, None] < R) & (rs[None, :] < R)
        grad_z = tl.zeros((BLOCK_N, R_P), dtype=tl.float32)
        grad_g = tl.zeros((BLOCK_N, E_P), dtype=tl.float32)
        for e in range(0, E):
            one_hot = es[None, :] == e
            g = tl.sum(tl.where(one_hot, gates, 0.0), axis=1)  # (BLOCK_N,)
            core = tl.load(c_ptr + e * R * R + rs[:, None] * R + rs[None, :], mask=core_mask, other=0.0)
            back = tl.dot(dm, core.to(CD), input_precision=PRECISION)  # (BLOCK_N, R_P): M_e^T dm per token
            grad_z += g[:, None] * back
            grad_g += tl.where(one_hot, tl.sum(back * z, axis=1)[:, None], 0.0)  # column e: <M_e^T dm, z>
        grad_logits = probs * (grad_g - tl.sum(grad_g * probs, axis=1)[:, None])  # float32 softmax backward
        tl.store(dz_ptr + rows[:, None] * R + rs[None, :], grad_z.to(dz_ptr.dtype.element_ty), mask=tok_mask)
        tl.store(
            dl_ptr + rows[:, None] * E + es[None, :], grad_logits.to(dl_ptr.dtype.element_ty), mask=exp_mask
        )

    @triton.jit
    def _core_grad(z_ptr, dm_ptr, g_ptr, out_ptr, N, E, R, BLOCK_N: tl.constexpr, R_P: tl.constexpr,
                   ATOMIC: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        CD: tl.constexpr = z_ptr.dtype.element_ty
        e = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        rs = tl.arange(0, R_P)
        acc = tl.zeros((R_P, R_P), dtype=tl.float32)  # [o, i]
        for block in range(split, tl.cdiv(N, BLOCK_N), splits):  # fixed order: deterministic per program
            rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            row_ok = rows < N
            tok_mask = row_ok[:, None] & (rs[None, :] < R)
            z = tl.load(z_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)
            dm = tl.load(dm_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)
            g = tl.load(g_ptr + rows * E + e, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
            gdm = (g[:, None] * dm.to(tl.float32)).to(CD)  # (BLOCK_N, R_P): g_e dm
            acc += tl.dot(tl.trans(gdm), z, input_precision=PRECISION)  # (R_P, R_P): sum_n g_e dm z^T
        out_mask = (rs[:, None] < R) & (rs[None, :] < R)
        offsets = rs[:, None] * R + rs[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptr + e * R * R + offsets, acc, mask=out_mask)
        else:
            tl.store(out_ptr + (split * E + e) * R * R + offsets, acc, mask=out_mask)


def forward(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_forward``: ``(N, r), (N, k), (E, k), (E, r, r) -> mixed (N, r) in z's dtype, probs (N, E) fp32``.

    All inputs must be contiguous and on the same device.
    """
    n, r = z.shape
    k, num_experts = router_input.shape[1], cores.shape[0]
    mixed = torch.empty_like(z)  # (N, r)
    probs = torch.empty(n, num_experts, device=z.device, dtype=torch.float32)  # (N, E)
    cfg = launch_config(n, k, num_experts, r, z.dtype)
    grid = (max(1, triton.cdiv(n, cfg.BLOCK_N)),)
    _forward[grid](
        z, router_input, router_weight, cores, mixed, probs, n, k, num_experts, r,
        PRECISION=precision(z.dtype), num_warps=cfg.num_warps, **cfg.constexprs(),
    )  # fmt: skip
    return mixed, probs


def backward(
    z: torch.Tensor,
    router_input: torch.Tensor,
    router_weight: torch.Tensor,
    cores: torch.Tensor,
    grad_m: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``z (N, r)``, ``router_input (N, k)``, ``router_weight (E, k)``, ``cores (E, r, r)``.

    Each gradient has the dtype of its input. ``grad_m (N, r)`` must be in ``z``'s dtype and contiguous.
    ``deterministic``: no atomics, fixed reduction order (bitwise reproducible; one ``(S, E, r, r)``
    float32 buffer more).
    """
    n, r = z.shape
    k, num_experts = router_input.shape[1], cores.shape[0]
    cd = z.dtype
    cfg = launch_config(n, k, num_experts, r, cd)
    grad_z = torch.empty_like(z)  # (N, r)
    grad_logits = torch.empty(n, num_experts, device=z.device, dtype=cd)  # (N, E)
    gates = torch.empty(n, num_experts, device=z.device, dtype=cd)  # (N, E)
    prec = precision(cd)
    _backward_tokens[(max(1, triton.cdiv(n, cfg.BLOCK_N)),)](
        z, router_input, router_weight, cores, grad_m, grad_z, grad_logits, gates, n, k, num_experts, r,
        PRECISION=prec, num_warps=cfg.num_warps, **cfg.constexprs(),
    )  # fmt: skip
    shape = (num_experts, r, r)
    if deterministic:
        out = torch.empty(cfg.core_splits, *shape, device=z.device, dtype=torch.float32)  # (S, E, r, r)
    else:
        out = torch.zeros(shape, device=z.device, dtype=torch.float32)  # (E, r, r)
    _core_grad[(num_experts, cfg.core_splits)](
        z, grad_m, gates, out, n, num_experts, r, BLOCK_N=cfg.BLOCK_N, R_P=cfg.R_P,
        ATOMIC=not deterministic, PRECISION=prec, num_warps=cfg.num_warps,
    )  # fmt: skip
    grad_cores = out.sum(0) if deterministic else out
    u = router_input.to(cd)
    grad_u = (grad_logits @ router_weight.to(cd)).to(router_input.dtype)  # (N, k)
    grad_w = (grad_logits.t() @ u).to(router_weight.dtype)  # (E, k)
    return grad_z, grad_u, grad_w, grad_cores.to(cores.dtype)
