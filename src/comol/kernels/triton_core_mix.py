"""Triton kernels for CUDA: router logits, float32 softmax and core mixing fused, forward and backward.

Notation: ``N`` tokens, ``k`` router input width (``r`` or ``d_in``), ``E`` experts, ``r`` rank. Each
program handles ``BLOCK_N`` tokens:

- forward: ``logits = u W_g^T`` (loop over ``k``), ``probs = softmax`` in float32, then the mixture as one
  matmul ``m = (g ⊗ z) C`` with ``C[(e, i), o] = M_e[o, i]`` (``K = E r``), so no per-token ``r x r``
  matrix and no ``(N, E, r)`` tensor ever reaches global memory;
- backward: recomputes ``probs`` and, from ``dm``, produces ``dL/dlogits (N, E)`` (float32), the mixing
  part of ``dL/dz (N, r)`` and ``dL/dcores`` (accumulated with atomics); the two router matmuls
  (``dL/du = dlogits W_g``, ``dL/dW_g = dlogits^T u``) are left to cuBLAS.

Sizes are padded to powers of two (at least 16, the smallest ``tl.dot``) with masked loads. The kernels
also run on CPU tensors under ``TRITON_INTERPRET=1`` (slowly), which is how the tests check them without a
GPU. Reference: :func:`comol.kernels.routed.routed_core_mix_eager`.
"""

from __future__ import annotations

from typing import Any

import torch


def triton_importable() -> bool:
    """Whether the ``triton`` package could be imported."""
    return triton is not None


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

if triton is not None:

    @triton.jit
    def _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               E_P: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        es = tl.arange(0, E_P)
        e_ok = es < E
        acc = tl.zeros((BLOCK_N, E_P), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            u = tl.load(
                u_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(w_ptr + es[None, :] * K + ks[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            acc += tl.dot(u, w, input_precision=PRECISION)  # (BLOCK_N, E_P)
        logits = tl.where(e_ok[None, :], acc, float("-inf"))
        ex = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        return ex / tl.sum(ex, axis=1)[:, None]  # (BLOCK_N, E_P) float32, 0 on padded experts

    @triton.jit
    def _forward(z_ptr, u_ptr, w_ptr, c_ptr, m_ptr, p_ptr, N, K, E, R, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        es = tl.arange(0, E_P)
        rs = tl.arange(0, R_P)
        probs = _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N, BLOCK_K, E_P, PRECISION)
        tl.store(p_ptr + rows[:, None] * E + es[None, :], probs, mask=row_ok[:, None] & (es[None, :] < E))
        z = tl.load(
            z_ptr + rows[:, None] * R + rs[None, :], mask=row_ok[:, None] & (rs[None, :] < R), other=0.0
        )
        gates = probs.to(z.dtype).to(tl.float32)  # the eager path mixes with gates in z's dtype
        gz = tl.reshape(gates[:, :, None] * z.to(tl.float32)[:, None, :], (BLOCK_N, E_P * R_P))  # (n, (e, i))
        q = tl.arange(0, E_P * R_P)
        qe, qi = q // R_P, q % R_P
        cores = tl.load(
            c_ptr + qe[:, None] * R * R + rs[None, :] * R + qi[:, None],
            mask=(qe[:, None] < E) & (qi[:, None] < R) & (rs[None, :] < R),
            other=0.0,
        )  # (E_P * R_P, R_P): [(e, i), o] = M_e[o, i]
        mixed = tl.dot(gz.to(cores.dtype), cores, input_precision=PRECISION)  # (BLOCK_N, R_P)
        tl.store(
            m_ptr + rows[:, None] * R + rs[None, :],
            mixed.to(z.dtype),
            mask=row_ok[:, None] & (rs[None, :] < R),
        )

    @triton.jit
    def _backward(z_ptr, u_ptr, w_ptr, c_ptr, dm_ptr, dz_ptr, dl_ptr, dc_ptr, N, K, E, R, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, E_P: tl.constexpr, R_P: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        es = tl.arange(0, E_P)
        rs = tl.arange(0, R_P)
        tok_mask = row_ok[:, None] & (rs[None, :] < R)
        probs = _probs(u_ptr, w_ptr, rows, row_ok, K, E, BLOCK_N, BLOCK_K, E_P, PRECISION)
        z = tl.load(z_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)
        dm = tl.load(dm_ptr + rows[:, None] * R + rs[None, :], mask=tok_mask, other=0.0)
        gates = probs.to(z.dtype).to(tl.float32)
        q = tl.arange(0, E_P * R_P)
        qe, qi = q // R_P, q % R_P
        q_ok = (qe < E) & (qi < R)
        cores_t = tl.load(
            c_ptr + qe[None, :] * R * R + rs[:, None] * R + qi[None, :],
            mask=q_ok[None, :] & (rs[:, None] < R),
            other=0.0,
        )  # (R_P, E_P * R_P): [o, (e, i)] = M_e[o, i]
        back = tl.reshape(
            tl.dot(dm.to(cores_t.dtype), cores_t, input_precision=PRECISION), (BLOCK_N, E_P, R_P)
        )
        grad_z = tl.sum(gates[:, :, None] * back, axis=1)  # (BLOCK_N, R_P): sum_e g_e M_e^T dm
        grad_g = tl.sum(back * z.to(tl.float32)[:, None, :], axis=2)  # (BLOCK_N, E_P)
        grad_logits = probs * (grad_g - tl.sum(grad_g * probs, axis=1)[:, None])
        tl.store(dz_ptr + rows[:, None] * R + rs[None, :], grad_z, mask=tok_mask)
        tl.store(
            dl_ptr + rows[:, None] * E + es[None, :], grad_logits, mask=row_ok[:, None] & (es[None, :] < E)
        )
        gdm = tl.reshape(
            gates[:, :, None] * dm.to(tl.float32)[:, None, :], (BLOCK_N, E_P * R_P)
        )  # (n, (e, o))
        partial = tl.dot(tl.trans(gdm), z.to(tl.float32), input_precision=PRECISION)  # (E_P * R_P, R_P)
        tl.atomic_add(
            dc_ptr + qe[:, None] * R * R + qi[:, None] * R + rs[None, :],
            partial,
            mask=q_ok[:, None] & (rs[None, :] < R),
        )  # qi plays the role of o here: dC[e, o, i]


def _launch_config(n: int, k: int, num_experts: int, r: int) -> dict[str, int]:
    e_p, r_p = _pow2(num_experts), _pow2(r)
    block_n = max(16, min(64, 16384 // (e_p * r_p)))
    return {"BLOCK_N": block_n, "BLOCK_K": min(64, _pow2(k)), "E_P": e_p, "R_P": r_p}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _TritonRoutedCoreMix(torch.autograd.Function):
    @staticmethod
    def forward(
        z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_experts, r = cores.shape[0], cores.shape[1]
        zf = z.reshape(-1, r).contiguous()
        uf = router_input.reshape(zf.shape[0], -1).contiguous()
        n, k = uf.shape
        mixed = torch.empty_like(zf)  # (N, r)
        probs = torch.empty(n, num_experts, device=z.device, dtype=torch.float32)  # (N, E)
        cfg = _launch_config(n, k, num_experts, r)
        grid = (max(1, -(-n // cfg["BLOCK_N"])),)
        _forward[grid](
            zf, uf, router_weight.contiguous(), cores.contiguous(), mixed, probs, n, k, num_experts, r,
            PRECISION=_precision(z.dtype), **cfg,
        )  # fmt: skip
        lead = z.shape[:-1]
        return mixed.view(*lead, r), probs.view(*lead, num_experts)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(
        ctx: Any, grad_m: torch.Tensor, _grad_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        z, router_input, router_weight, cores = ctx.saved_tensors
        num_experts, r = cores.shape[0], cores.shape[1]
        zf = z.reshape(-1, r).contiguous()
        uf = router_input.reshape(zf.shape[0], -1).contiguous()
        n, k = uf.shape
        grad_z = torch.empty(n, r, device=z.device, dtype=torch.float32)
        grad_logits = torch.empty(n, num_experts, device=z.device, dtype=torch.float32)
        grad_cores = torch.zeros(num_experts, r, r, device=z.device, dtype=torch.float32)
        cfg = _launch_config(n, k, num_experts, r)
        grid = (max(1, -(-n // cfg["BLOCK_N"])),)
        _backward[grid](
            zf, uf, router_weight.contiguous(), cores.contiguous(), grad_m.reshape(n, r).to(z.dtype).contiguous(),
            grad_z, grad_logits, grad_cores, n, k, num_experts, r, PRECISION=_precision(z.dtype), **cfg,
        )  # fmt: skip
        grad_logits = grad_logits.to(router_weight.dtype)
        grad_u = grad_logits @ router_weight  # (N, k)
        grad_w = grad_logits.t() @ uf  # (E, k)
        return (
            grad_z.to(z.dtype).view_as(z),
            grad_u.view_as(router_input),
            grad_w,
            grad_cores.to(cores.dtype),
        )


def routed_core_mix_triton(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`comol.kernels.fused.routed_core_mix_fused` (same arguments and results).

    Args:
        z: ``(..., r)``.
        router_input: ``(..., k)``, ``z`` or the layer input.
        router_weight: ``(E, k)``.
        cores: ``(E, r, r)``.

    Returns:
        ``mixed (..., r)`` and ``probs (..., E)`` float32.
    """
    if not torch.is_grad_enabled() or not any(
        t.requires_grad for t in (z, router_input, router_weight, cores)
    ):
        with torch.no_grad():
            return _TritonRoutedCoreMix.forward(z, router_input, router_weight, cores)
    return _TritonRoutedCoreMix.apply(z, router_input, router_weight, cores)
