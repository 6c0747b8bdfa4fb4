"""PyTorch fast paths for CoMoL's core mixing: custom ``autograd.Function`` s with hand-written backward.

Notation: ``N`` tokens (leading dimensions flattened), ``r`` rank, ``E`` experts, ``k`` router input width
(``r`` for core-space routing, ``d_in`` for input routing).

The eager path (:func:`comol.kernels.eager.core_mix_eager`) keeps the experts' outputs ``(N, E, r)`` alive for
backward, plus the float32 router probabilities ``(N, E)``. The functions here save only the *inputs*
(``z``, the router input, small weights) and recompute the rest in backward, so the memory kept for
backward matches plain LoRA's up to an ``(N, r)`` term whatever ``E`` is.

Token-minor layout: inside these functions the per-token quantities are held transposed, tokens last
(``zT (r, N)``, logits and gates ``(E, N)``). Their small dimensions (``r``, ``E``: 4-64) are then the outer ones, so
the element-wise products and sums of the mixing and the softmax run along the long token axis, where they
vectorise, instead of along rows of 8-16 values (on a CPU, about half the time for ``r = 16, E = 8``). The
small matmuls take either layout at the same cost; ``B`` consumes the transposed mixture directly
(``(mixed^T)^T B^T``), and the ``d_in``-wide projections (``A x``, an input router) are computed tokens first and
transposed (:func:`_project`).

Maths (per token; ``M_e = cores[e]`` laid out ``[out, in]``, ``dm = dL/dm``)::

    logits = W_g u                    probs = softmax_f32(logits)      g = probs (cast to z's dtype)
    m      = sum_e g_e M_e z
    dL/dM_e   = sum_n g_ne dm_n z_n^T
    dL/dg_e   = dm^T M_e z  = <M_e^T dm, z>
    dL/dz     = sum_e g_e M_e^T dm   (+ W_g^T dL/dlogits when u is z)
    dL/dlogits = probs * (dL/dg - <dL/dg, probs>)                    (float32)
    dL/du     = W_g^T dL/dlogits,    dL/dW_g = sum_n dL/dlogits_n u_n^T
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from comol.mixture.routing import softmax_f32

SMALL_N = 64  # up to this many tokens (decoding), branch_inference may take its fusible form under compile
# Largest (tokens x E r^2) product the fusible decoding form (see branch_inference) is traced for: inductor
# fuses its broadcast products into a reduction, a backend that does not fuse materialises them.
FUSIBLE_MAX = 1 << 20


def _mix(
    z_t: torch.Tensor, gates_t: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``zT (r, N), gatesT (E, N), cores (E, r, r) -> mixedT (r, N)``: ``sum_e g_e M_e z`` per token, and the
    temporaries :func:`_mix_backward` reuses when backward recomputes the mix (never saved for backward).

    Two orders with the same FLOPs (``2 N E r^2``), chosen by which temporary is smaller:

    - ``E <= r``: ``m^T = S (g ⊗ z)^T`` with ``S[o, (e, i)] = M_e[o, i]``, one GEMM over ``K = E r``
      (temporary ``(E r, N)``; parts: ``(outerT (E r, N), S (r, E r))``);
    - ``E > r``: each token's merged core ``sum_e g_e M_e``, then its product with ``z`` (temporary
      ``(r, r, N)``, independent of ``E``; parts: ``(mergedT (r_out, r_in, N),)``).
    """
    num_experts, r_out, r_in = cores.shape
    n = z_t.shape[1]
    if num_experts <= r_in:
        outer_t = (gates_t.unsqueeze(1) * z_t.unsqueeze(0)).view(num_experts * r_in, n)  # (E r, N)
        stacked = cores.transpose(0, 1).reshape(r_out, num_experts * r_in)  # S[o, (e, i)] = M_e[o, i]
        return stacked @ outer_t, (outer_t, stacked)
    merged_t = (cores.reshape(num_experts, r_out * r_in).t() @ gates_t).view(r_out, r_in, n)  # (r, r, N)
    return (merged_t * z_t.unsqueeze(0)).sum(1), (merged_t,)


def _mix_backward(
    z_t: torch.Tensor,
    gates_t: torch.Tensor,
    cores: torch.Tensor,
    grad_m: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_mix` w.r.t. ``zT (r, N)``, ``gatesT (E, N)`` and ``cores (E, r, r)``, from
    ``grad_m (N, r)`` (tokens first: the layout ``dL/d(mixed) = dL/d(delta) B`` comes in) and ``parts``, the
    temporaries of :func:`_mix` for the same inputs."""
    num_experts, r_out, r_in = cores.shape
    n = z_t.shape[1]
    grad_m_t = grad_m.t().contiguous()  # (r_out, N)
    if num_experts <= r_in:
        outer_t, stacked = parts
        back = (stacked.t() @ grad_m_t).view(num_experts, r_in, n)  # (E, r_in, N): M_e^T dm per expert
        grad_z_t = (gates_t.unsqueeze(1) * back).sum(0)  # (r_in, N)
        grad_gates_t = (back * z_t.unsqueeze(0)).sum(1)  # (E, N)
        grad_c = outer_t @ grad_m  # (E r_in, r_out): C[(e, i), o] = M_e[o, i]
        return grad_z_t, grad_gates_t, grad_c.view(num_experts, r_in, r_out).transpose(1, 2)
    (merged_t,) = parts
    grad_z_t = (merged_t * grad_m_t.unsqueeze(1)).sum(0)  # (r_in, N): merged^T dm
    grad_merged_t = (grad_m_t.unsqueeze(1) * z_t.unsqueeze(0)).view(r_out * r_in, n)  # (r^2, N)
    flat_cores = cores.reshape(num_experts, r_out * r_in)  # (E, r^2)
    grad_gates_t = flat_cores @ grad_merged_t  # (E, N)
    grad_cores = (gates_t @ grad_merged_t.t()).view(num_experts, r_out, r_in)
    return grad_z_t, grad_gates_t, grad_cores


def _softmax_backward(grad_probs_t: torch.Tensor, probs_t: torch.Tensor) -> torch.Tensor:
    """``dL/dlogits = probs * (dL/dprobs - <dL/dprobs, probs>)`` for ``probs_t = softmax_f32(logits_t, dim=0)``
    ``(E, N)``."""
    return torch._softmax_backward_data(grad_probs_t, probs_t, 0, probs_t.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    """``(..., c) -> (c, N)`` contiguous: the token-minor copy of a per-token tensor."""
    return _flat(t).t().contiguous()


def _project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (N, k), weight (c, k) -> (weight x^T) (c, N)``, token-minor. Computed tokens first and then transposed
    (a copy of ``c N`` values): ``weight @ x.t()`` reads ``x`` transposed, up to 1.7x slower on CPU for
    ``k = d_in`` in the thousands."""
    return (x @ weight.t()).t().contiguous()


def _autocast_of(t: torch.Tensor) -> tuple[str, torch.dtype] | None:
    """The autocast state in force for ``t``'s device (called in forward), or None when autocast is off."""
    device_type = t.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _replay_autocast(state: tuple[str, torch.dtype] | None) -> contextlib.AbstractContextManager:
    """Backward runs outside autocast; re-enter the forward's state so that its matmuls see the same operand
    dtypes (e.g. bf16 activations with fp32 adapter weights, as ``Trainer(bf16=True)`` hands them). The
    autograd engine casts each returned gradient to its input's dtype."""
    if state is None:
        return contextlib.nullcontext()
    return torch.autocast(state[0], dtype=state[1])


def _with_forward_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Run an ``autograd.Function.backward`` under the autocast state its forward recorded in ``ctx.autocast``."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Any) -> Any:
        with _replay_autocast(ctx.autocast):
            return backward(ctx, *grads)

    return wrapped


class _CoreMix(torch.autograd.Function):
    """``m = sum_e g_e M_e z``, saving only ``z``, ``gates`` and ``cores`` (no ``(N, E, r)`` tensor)."""

    @staticmethod
    def forward(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
        mixed_t, _ = _mix(_tokens_last(z), _tokens_last(gates), cores)  # (r, N)
        return mixed_t.t().view(*z.shape[:-1], cores.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        z, gates, cores = inputs
        ctx.save_for_backward(z, gates, cores)
        ctx.autocast = _autocast_of(z)

    @staticmethod
    @_with_forward_autocast
    def backward(ctx: Any, grad_m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z, gates, cores = ctx.saved_tensors
        z_t, gates_t = _tokens_last(z), _tokens_last(gates)
        _, parts = _mix(z_t, gates_t, cores)  # the temporaries, recomputed
        grad_z_t, grad_gates_t, grad_cores = _mix_backward(
            z_t, gates_t, cores, _flat(grad_m).to(z.dtype), parts
        )
        return grad_z_t.t().view_as(z), grad_gates_t.t().view_as(gates), grad_cores


def core_mix_fused(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Same result as ``core_mix_eager``; backward saves ``z (..., r)`` and ``gates (..., E)`` only."""
    return _CoreMix.apply(z, gates, cores)


class _RoutedCoreMix(torch.autograd.Function):
    """Router logits, float32 softmax and core mixing in one node.

    ``router_input`` is None for core-space routing (the router reads ``z``; passing ``z`` twice would be a
    duplicate input, which ``torch.compile`` refuses), else the layer input ``x`` that the A projection
    saves anyway. Saves ``z``, ``x``, the router weight and the cores; probabilities and expert outputs are
    recomputed in backward.
    """

    @staticmethod
    def _probs(
        z_t: torch.Tensor, router_input: torch.Tensor | None, router_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and float32 probabilities ``(E, N)``, token-minor."""
        if router_input is None:
            logits_t = router_weight @ z_t  # (E, N)
        else:
            logits_t = _project(_flat(router_input), router_weight)
        return logits_t, softmax_f32(logits_t, dim=0)

    @staticmethod
    def forward(
        z: torch.Tensor, router_input: torch.Tensor | None, router_weight: torch.Tensor, cores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_t = _tokens_last(z)  # (r, N)
        _, probs_t = _RoutedCoreMix._probs(z_t, router_input, router_weight)  # (E, N) float32
        mixed_t, _ = _mix(z_t, probs_t.to(z.dtype), cores)  # (r, N)
        lead = z.shape[:-1]
        return mixed_t.t().view(*lead, cores.shape[1]), probs_t.t().view(*lead, cores.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, ...]) -> None:
        z, router_input, router_weight, cores = inputs
        ctx.save_for_backward(z, router_input, router_weight, cores)
        ctx.mark_non_differentiable(output[1])
        ctx.autocast = _autocast_of(z)

    @staticmethod
    @_with_forward_autocast
    def backward(
        ctx: Any, grad_m: torch.Tensor, _grad_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        z, router_input, router_weight, cores = ctx.saved_tensors
        z_t = _tokens_last(z)  # (r, N)
        logits_t, probs_t = _RoutedCoreMix._probs(z_t, router_input, router_weight)  # (E, N), recomputed
        gates_t = probs_t.to(z.dtype)
        _, parts = _mix(z_t, gates_t, cores)
        grad_z_t, grad_gates_t, grad_cores = _mix_backward(
            z_t, gates_t, cores, _flat(grad_m).to(z.dtype), parts
        )
        grad_logits_t = _softmax_backward(grad_gates_t.to(probs_t.dtype), probs_t).to(
            logits_t.dtype
        )  # (E, N)
        if router_input is None:  # the router's input is z: both gradients meet there
            grad_w = grad_logits_t @ z_t.t()  # (E, r)
            grad_z_t = torch.addmm(grad_z_t, router_weight.t(), grad_logits_t)  # (r, N)
            return grad_z_t.t().view_as(z), None, grad_w, grad_cores
        grad_w = grad_logits_t @ _flat(router_input)  # (E, k)
        grad_u = grad_logits_t.t() @ router_weight  # (N, k)
        return grad_z_t.t().view_as(z), grad_u.view_as(router_input), grad_w, grad_cores


def routed_core_mix_fused(
    z: torch.Tensor, router_input: torch.Tensor, router_weight: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``softmax_f32(router_input W_g^T)`` and core mixing.

    Args:
        z: ``(..., r)`` low-rank codes.
        router_input: ``(..., k)``: ``z`` itself (core-space routing) or the layer input ``x``.
        router_weight: ``(E, k)``.
        cores: ``(E, r, r)``.

    Returns:
        ``mixed (..., r)`` and the router ``probs (..., E)`` in float32 (detached, for statistics).
    """
    u = None if router_input is z else router_input
    if not torch.is_grad_enabled() or not any(
        t.requires_grad for t in (z, router_input, router_weight, cores)
    ):  # inference: same maths, no autograd node
        with torch.no_grad():
            return _RoutedCoreMix.forward(z, u, router_weight, cores)
    return _RoutedCoreMix.apply(z, u, router_weight, cores)


# --------------------------------------------------------------------------------------------------------
# The whole adapter branch
# --------------------------------------------------------------------------------------------------------
def _branch_codes(
    x: torch.Tensor,
    router_x: torch.Tensor | None,
    lora_A: torch.Tensor,
    router_weight: torch.Tensor,
    core_router: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat inputs ``(N, d_in)``; returns ``zT (r, N)``, the logits ``(E, N)`` and what backward keeps to get them
    again: ``zT`` alone for core-space routing (the logits are recomputed from it); for input routing the
    logits too (they cost a ``d_in`` matmul), as one ``[zT; logitsT] (r + E, N)`` when one matmul gave both."""
    r = lora_A.shape[0]
    if core_router:
        z_t = _project(x, lora_A)  # (r, N)
        return z_t, router_weight @ z_t, z_t, None
    if router_x is None:  # input routing on the same x: A and the router in one matmul
        z_logits_t = _project(x, torch.cat([lora_A, router_weight]))  # (r + E, N)
        return z_logits_t[:r], z_logits_t[r:], z_logits_t, None
    # input routing on x before dropout, A on the dropped-out x
    z_t, logits_t = _project(x, lora_A), _project(router_x, router_weight)
    return z_t, logits_t, z_t, logits_t


class InferenceWeights(NamedTuple):
    """CoMoL's adapter weights laid out once for inference (:func:`prepare_inference`), so that a decoding step
    runs the fewest operations, each on operands in the layout it reads fastest: the scaling is folded into the
    cores, for input routing the router into ``A``'s matmul, and every matrix is stored as the right-hand operand
    of ``torch.matmul`` (``(in, out)``): at decoding sizes ``F.linear``'s transposed dispatch costs about as much
    as the product.

    Attributes:
        lora_in: ``(d_in, r)``, ``A^T`` (a view, no copy), for core-space routing (folding ``W_g A`` in would read
            ``E d_in`` more weights per token to save one small matmul); ``(d_in, r + E)``, ``[A; W_g]^T``, for
            input routing: one matmul gives ``z`` and the router logits.
        router_weight: ``(k, E)``, ``W_g^T`` (a view).
        mixing: ``s * cores`` as one matrix: ``(E r_in, r_out)`` with ``C[(e, i), o] = M_e[o, i]`` when
            ``E <= r`` (the outer-product order), else ``(E, r_out r_in)``, mixed by the gates into each token's
            core (a temporary of ``r^2`` per token whatever ``E`` is).
        lora_B: ``(r, d_out)``, ``B^T`` as a contiguous copy (``r d_out`` values: a product with ``K = r`` reads a
            transposed view markedly slower); a view while ``torch.compile`` traces (the copy would be made every step).
    """

    lora_in: torch.Tensor
    router_weight: torch.Tensor
    mixing: torch.Tensor
    lora_B: torch.Tensor


def prepare_inference(
    lora_A: torch.Tensor,
    router_weight: torch.Tensor,
    cores: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    core_router: bool,
) -> InferenceWeights:
    """:class:`InferenceWeights` for the weights of one adapter (shapes as :func:`comol_branch_fused`).

    The scaled cores are computed in at least float32 and stored in the cores' dtype. Nothing here needs grad.
    """
    with torch.no_grad():
        num_experts, r_out, r_in = cores.shape
        lora_in = lora_A if core_router else torch.cat([lora_A, router_weight.to(lora_A.dtype)])
        scaled = cores.to(torch.promote_types(cores.dtype, torch.float32)) * scaling  # (E, r_out, r_in)
        if num_experts <= r_in:  # C[(e, i), o] = s M_e[o, i]
            mixing = scaled.transpose(1, 2).reshape(num_experts * r_in, r_out)
        else:  # row e: s M_e flattened [out, in]
            mixing = scaled.reshape(num_experts, r_out * r_in)
        # traced by torch.compile, this runs every step (nothing is kept): B^T stays a view that the matmul reads
        lora_b = lora_B.t() if torch.compiler.is_compiling() else lora_B.t().contiguous()
        return InferenceWeights(lora_in.t(), router_weight.t(), mixing.to(cores.dtype).contiguous(), lora_b)


def branch_inference(
    x: torch.Tensor, weights: InferenceWeights, router_x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CoMoL's adapter branch without autograd, on any leading dimensions, from :func:`prepare_inference`'s
    weights, in as few operations as the maths allows: at decoding sizes each operation's fixed cost (dispatch
    on a CPU, a kernel launch on a GPU) outweighs its arithmetic. Core-space routing: matmuls for ``z`` and the
    logits; input routing: one matmul and a split. Then the float32 softmax, the mixing (an outer product and one
    matmul for ``E <= r``; the merged cores and their product with ``z`` above) and the matmul by ``B``.

    Traced by ``torch.compile`` for few tokens (at most :data:`SMALL_N`, and tokens x ``E r^2`` at most
    :data:`FUSIBLE_MAX`), the small products (core-space router logits, the mixing) are written instead as
    broadcast products and sums, which inductor fuses with the softmax into one generated kernel, where matmuls
    would be separate library calls, each costing more than its arithmetic at decoding sizes. ``A`` and ``B``
    stay matmuls.

    Args:
        x: ``(..., d_in)`` input of ``A`` (after dropout).
        weights: the adapter's :class:`InferenceWeights`.
        router_x: ``(..., d_in)``: the router's input where it differs from ``x`` (input routing with active
            dropout), else None.

    Returns:
        ``delta (..., d_out)`` (scaling included) and ``probs (..., E)`` float32.
    """
    lora_in, router_weight, mixing, lora_B = weights
    r, num_experts = lora_B.shape[0], router_weight.shape[1]
    fusible = (
        torch.compiler.is_compiling()
        and x.numel() <= SMALL_N * x.shape[-1]
        and x.numel() // x.shape[-1] * mixing.numel() <= FUSIBLE_MAX
    )
    if lora_in.shape[1] == r:  # core-space routing
        z = torch.matmul(x, lora_in)  # (..., r)
        logits = (
            (z.unsqueeze(-1) * router_weight).sum(-2) if fusible else torch.matmul(z, router_weight)
        )  # (..., E)
    elif router_x is None:
        z, logits = torch.matmul(x, lora_in).split_with_sizes((r, num_experts), dim=-1)  # (..., r), (..., E)
    else:
        z, logits = torch.matmul(x, lora_in[:, :r]), torch.matmul(router_x, router_weight)
    probs = softmax_f32(logits)  # (..., E) float32
    gates = probs if probs.dtype == z.dtype else probs.to(z.dtype)
    if num_experts <= r:  # (g ⊗ z) C: one GEMM over K = E r (the layout prepare_inference chose)
        outer = (gates.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # (..., E r)
        mixed = (outer.unsqueeze(-1) * mixing).sum(-2) if fusible else torch.matmul(outer, mixing)  # (..., r)
    elif fusible:  # each token's core sum_e g_e s M_e (..., r, r), then its product with z
        merged = (gates.unsqueeze(-1) * mixing).sum(-2).unflatten(-1, (r, r))  # (..., r_out, r_in)
        mixed = (merged * z.unsqueeze(-2)).sum(-1)  # (..., r)
    else:
        merged = torch.matmul(gates, mixing).unflatten(-1, (r, r))  # (..., r_out, r_in)
        mixed = torch.matmul(merged, z.unsqueeze(-1)).squeeze(-1)  # (..., r)
    return torch.matmul(mixed, lora_B), probs


class _CoMoLBranch(torch.autograd.Function):
    """``delta = s B (sum_e g_e M_e) A x`` with ``g = softmax_f32(W_g u)``, ``u = A x`` or ``x``: one node, in the
    token-minor layout (module docstring).

    Saves what LoRA saves (``x`` and ``z = A x``, here as ``zT``; for input routing ``[zT; logitsT]`` and, with
    dropout, the router's input), recomputes probabilities and the mixture in backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        router_x: torch.Tensor | None,
        lora_A: torch.Tensor,
        router_weight: torch.Tensor,
        cores: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        core_router: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_t, logits_t, kept, kept_logits = _branch_codes(x, router_x, lora_A, router_weight, core_router)
        probs_t = softmax_f32(logits_t, dim=0)  # (E, N) float32
        mixed_t, _ = _mix(z_t, probs_t.to(z_t.dtype), cores)  # (r, N), a fresh tensor
        delta = mixed_t.mul_(scaling).t() @ lora_B.t()  # (N, d_out): scaling applied on the small side
        ctx.scaling, ctx.core_router, ctx.has_router_x = scaling, core_router, router_x is not None
        ctx.autocast = _autocast_of(x)
        ctx.save_for_backward(x, router_x, kept, kept_logits, lora_A, router_weight, cores, lora_B)
        probs = probs_t.t()  # (N, E), a view
        ctx.mark_non_differentiable(probs)
        return delta, probs

    @staticmethod
    @_with_forward_autocast
    def backward(ctx: Any, grad_delta: torch.Tensor, _grad_probs: torch.Tensor | None) -> tuple[Any, ...]:
        x, router_x, kept, logits_t, lora_A, router_weight, cores, lora_B = ctx.saved_tensors
        s, r = ctx.scaling, lora_A.shape[0]
        if ctx.core_router:
            z_t = kept
            logits_t = router_weight @ z_t  # (E, N), recomputed
        elif logits_t is None:
            z_t, logits_t = kept[:r], kept[r:]
        else:
            z_t = kept
        probs_t = softmax_f32(logits_t, dim=0)  # (E, N) float32
        gates_t = probs_t.to(z_t.dtype)
        grad_delta = grad_delta.to(z_t.dtype)
        mixed_t, parts = _mix(z_t, gates_t, cores)  # (r, N), recomputed
        grad_B = (grad_delta.t() @ mixed_t.t()).mul_(s)  # (d_out, r)
        grad_mixed = (grad_delta @ lora_B).mul_(s)  # (N, r)
        grad_z_t, grad_gates_t, grad_cores = _mix_backward(z_t, gates_t, cores, grad_mixed, parts)
        grad_logits_t = _softmax_backward(grad_gates_t.to(probs_t.dtype), probs_t).to(
            logits_t.dtype
        )  # (E, N)
        grad_x = grad_router_x = None
        if ctx.core_router:
            grad_w = grad_logits_t @ z_t.t()  # (E, r)
            grad_z_t = torch.addmm(grad_z_t, router_weight.t(), grad_logits_t)  # (r, N): mixing + routing
            grad_A = grad_z_t @ x  # (r, d_in)
            if ctx.needs_input_grad[0]:
                grad_x = grad_z_t.t() @ lora_A
        elif not ctx.has_router_x:
            grad_z_logits_t = torch.cat([grad_z_t, grad_logits_t])  # (r + E, N)
            grad_a_w = grad_z_logits_t @ x  # (r + E, d_in)
            grad_A, grad_w = grad_a_w[:r], grad_a_w[r:]
            if ctx.needs_input_grad[0]:
                grad_x = grad_z_logits_t.t() @ torch.cat([lora_A, router_weight])
        else:
            grad_A, grad_w = grad_z_t @ x, grad_logits_t @ router_x
            if ctx.needs_input_grad[0]:
                grad_x = grad_z_t.t() @ lora_A
            if ctx.needs_input_grad[1]:
                grad_router_x = grad_logits_t.t() @ router_weight
        return grad_x, grad_router_x, grad_A, grad_w, grad_cores, grad_B, None, None


def comol_branch_fused(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    router_weight: torch.Tensor,
    cores: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    core_router: bool,
    router_x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CoMoL's whole adapter branch (A, router, float32 softmax, mixing, B, scaling) as one autograd node.

    Args:
        x: ``(..., d_in)`` input of ``A`` (after dropout).
        lora_A: ``(r, d_in)``.
        router_weight: ``(E, r)`` for core-space routing, ``(E, d_in)`` for input routing.
        cores: ``(E, r, r)``.
        lora_B: ``(d_out, r)``.
        scaling: ``alpha / r``.
        core_router: route on ``z = A x`` (True) or on the input (False).
        router_x: ``(..., d_in)``: the router's input where it differs from ``x`` (input routing with
            dropout: ``x`` before dropout); None otherwise.

    Returns:
        ``delta (..., d_out)`` in ``x``'s dtype and the router ``probs (..., E)`` float32 (detached).
    """
    args = (x, router_x, lora_A, router_weight, cores, lora_B, scaling, core_router)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in args[:6]):
        # inference: same maths, no autograd node (a layer keeps the prepared weights between calls)
        weights = prepare_inference(lora_A, router_weight, cores, lora_B, scaling, core_router)
        with torch.no_grad():
            return branch_inference(x, weights, router_x)
    lead = x.shape[:-1]
    ru = None if router_x is None else _flat(router_x)
    delta, probs = _CoMoLBranch.apply(
        _flat(x), ru, lora_A, router_weight, cores, lora_B, scaling, core_router
    )
    return delta.view(*lead, lora_B.shape[0]), probs.view(*lead, cores.shape[0])
