"""PyTorch fast paths for CoMoL's core mixing: custom ``autograd.Function`` s with hand-written backward.

Notation: ``N`` tokens (leading dimensions flattened), ``r`` rank, ``E`` experts, ``k`` router input width
(``r`` for core-space routing, ``d_in`` for input routing).

The eager path (:func:`comol.kernels.eager.core_mix_eager`) keeps the experts' outputs ``(N, E, r)`` alive for
backward, plus the float32 router probabilities ``(N, E)``. The functions here save only the *inputs*
(``z``, the router input, small weights) and recompute the rest in backward, so the memory kept for
backward matches plain LoRA's up to an ``(N, r)`` term whatever ``E`` is.

Two layouts of the per-token quantities, each where it measured faster on a CPU:

- tokens first (``z (N, r)``, gates ``(N, E)``): in :func:`core_mix_fused` and :func:`routed_core_mix_fused`,
  whose callers hand them codes in that layout (transposing at their boundary cost more than it saved), and in
  the whole adapter branch (:func:`comol_branch_fused`) for ``E > r``, where the cores are merged per token;
- token-minor (``z`` kept as ``(r, N)``, logits and gates computed as ``(E, N)``): in the branch for ``E <= r``, which
  makes ``z`` itself and mixes through the outer product of gates and codes. The small dimensions (``r``, ``E``:
  4-16) are then the outer ones, so the mixing's element-wise products and sums and the float32 softmax run
  along the long token axis, where they vectorise, instead of along rows of 8-16 values: a branch's forward
  and backward at 512 tokens, r=16, E=8 takes 0.90x (d=256), 0.93x (d=576) and 0.98x (d=4096) the time of
  the tokens-first code.

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

from comol.mixture.routing import softmax_f32, softmax_over_transpose

# Up to this many tokens (decoding), the tokens-first mixing merges cores per token (the lower fixed cost), and
# branch_inference may take its fusible form under torch.compile.
SMALL_N = 64
# Largest (tokens x E r^2) product the fusible decoding form (see branch_inference) is traced for: inductor
# fuses its broadcast products into a reduction, a backend that does not fuse materialises them.
FUSIBLE_MAX = 1 << 20


def _merged_order(n: int, num_experts: int, r: int) -> bool:
    """Whether :func:`_mix` merges cores per token (else it contracts the ``(N, E r)`` outer product)."""
    return num_experts > r or n <= SMALL_N


def _mix(z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """``(N, r), (N, E), (E, r, r) -> (N, r)``: ``sum_e g_e M_e z``; the temporary is never saved.

    Two orders with the same FLOPs (``2 N E r^2``), chosen by which temporary is smaller:

    - ``E <= r``: ``m = (g ⊗ z) C`` with ``C[(e, i), o] = M_e[o, i]``, one GEMM over ``K = E r``
      (temporary ``(N, E r)``);
    - ``E > r``, or few tokens (decoding): each token's merged core ``g @ M`` ``(N, r, r)``, then a batched
      product with ``z`` (temporary ``(N, r^2)``, independent of ``E``; no copy of the cores, fewer ops).
    """
    return _mix_parts(z, gates, cores)[0]


def _mix_parts(
    z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`_mix` and its temporaries, which :func:`_mix_backward` reuses when backward recomputes the mix:
    ``(merged (N, r, r),)`` in the merged order, ``(outer (N, E r), C (E r, r))`` in the outer-product order."""
    num_experts, r_out, r_in = cores.shape
    if _merged_order(z.shape[0], num_experts, r_in):
        merged = (gates @ cores.reshape(num_experts, r_out * r_in)).view(-1, r_out, r_in)  # (N, r, r)
        return torch.bmm(merged, z.unsqueeze(2)).squeeze(2), (merged,)
    # gates contiguous first: probs from the transposed softmax (softmax_f32) are a transposed view, and the
    # product would follow that layout, so that the reshape below would copy the (N, E r) temporary
    outer = (gates.contiguous().unsqueeze(2) * z.unsqueeze(1)).reshape(z.shape[0], num_experts * r_in)
    stacked = cores.transpose(1, 2).reshape(num_experts * r_in, r_out)  # C[(e, i), o] = M_e[o, i]
    return outer @ stacked, (outer, stacked)


def _mix_backward(
    z: torch.Tensor,
    gates: torch.Tensor,
    cores: torch.Tensor,
    grad_m: torch.Tensor,
    parts: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``_mix`` w.r.t. ``z (N, r)``, ``gates (N, E)``, ``cores (E, r, r)``; ``parts``: the
    temporaries of :func:`_mix_parts` for the same inputs, if backward has them (else recomputed)."""
    num_experts, r_out, r_in = cores.shape
    n = z.shape[0]
    if _merged_order(n, num_experts, r_in):  # the merged-core order
        flat_cores = cores.reshape(num_experts, r_out * r_in)  # (E, r*r)
        merged = (gates @ flat_cores).view(n, r_out, r_in) if parts is None else parts[0]  # (N, r, r)
        grad_z = (merged * grad_m.unsqueeze(2)).sum(1)  # (N, r_in): merged^T dm (faster than a tiny bmm)
        grad_merged = (grad_m.unsqueeze(2) * z.unsqueeze(1)).reshape(n, r_out * r_in)  # (N, r*r)
        grad_gates = grad_merged @ flat_cores.t()  # (N, E)
        grad_cores = (gates.t() @ grad_merged).view(num_experts, r_out, r_in)  # (E, r_out, r_in)
        return grad_z, grad_gates, grad_cores
    gates = gates.contiguous()  # see _mix_parts
    if parts is None:
        outer = (gates.unsqueeze(2) * z.unsqueeze(1)).reshape(n, num_experts * r_in)  # (N, E*r_in)
        stacked = cores.transpose(1, 2).reshape(num_experts * r_in, r_out)  # (E*r_in, r_out)
    else:
        outer, stacked = parts
    back = (grad_m @ stacked.t()).view(n, num_experts, r_in)  # (N, E, r_in): M_e^T dm per expert
    grad_z = (gates.unsqueeze(2) * back).sum(1)  # (N, r_in); products and sums beat N tiny bmm's on CPU
    # ... but not here: a batched (E, r) @ (r, 1) product is 1.1-2.6x faster on CPU than the product and the
    # sum over the last (short) dimension (r 8-32, E 2-16, N 512-2048), and needs no (N, E r) temporary
    grad_gates = torch.bmm(back, z.unsqueeze(2)).squeeze(2)  # (N, E)
    grad_stacked = outer.t() @ grad_m  # (E*r_in, r_out): dL/dC
    grad_cores = grad_stacked.view(num_experts, r_in, r_out).transpose(1, 2)  # (E, r_out, r_in)
    return grad_z, grad_gates, grad_cores


def _softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``dL/dlogits = probs * (dL/dprobs - <dL/dprobs, probs>)`` for ``probs = softmax_f32(logits)`` ``(N, E)``."""
    if softmax_over_transpose(probs):  # over the leading dimension, as softmax_f32 computed it
        return torch._softmax_backward_data(grad_probs.t(), probs.t(), 0, probs.dtype).t()
    return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


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
        return _mix(_flat(z), _flat(gates), cores).view(*z.shape[:-1], cores.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        z, gates, cores = inputs
        ctx.save_for_backward(z, gates, cores)
        ctx.autocast = _autocast_of(z)

    @staticmethod
    @_with_forward_autocast
    def backward(ctx: Any, grad_m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z, gates, cores = ctx.saved_tensors
        grad_z, grad_gates, grad_cores = _mix_backward(
            _flat(z), _flat(gates), cores, _flat(grad_m).to(z.dtype)
        )
        return grad_z.view_as(z), grad_gates.view_as(gates), grad_cores


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
    def forward(
        z: torch.Tensor, router_input: torch.Tensor | None, router_weight: torch.Tensor, cores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zf = _flat(z)
        uf = zf if router_input is None else _flat(router_input)
        probs = softmax_f32(uf @ router_weight.t())  # (N, E) float32
        mixed = _mix(zf, probs.to(z.dtype), cores)  # (N, r)
        lead = z.shape[:-1]
        return mixed.view(*lead, cores.shape[1]), probs.view(*lead, cores.shape[0])

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
        zf = _flat(z)
        uf = zf if router_input is None else _flat(router_input)
        logits = uf @ router_weight.t()  # (N, E), recomputed
        probs = softmax_f32(logits)  # (N, E) float32
        grad_z, grad_gates, grad_cores = _mix_backward(
            zf, probs.to(z.dtype), cores, _flat(grad_m).to(z.dtype)
        )
        grad_logits = _softmax_backward(grad_gates.to(probs.dtype), probs).to(logits.dtype)  # (N, E)
        grad_w = grad_logits.t() @ uf  # (E, k)
        if router_input is None:  # the router's input is z: both gradients meet there
            return torch.addmm(grad_z, grad_logits, router_weight).view_as(z), None, grad_w, grad_cores
        grad_u = grad_logits @ router_weight  # (N, k)
        return grad_z.view_as(z), grad_u.view_as(router_input), grad_w, grad_cores


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
# With E <= r the branch keeps its per-token tensors token-minor (module docstring) and mixes through the
# outer product; with E > r it keeps them tokens first and merges cores per token (rows of r^2 vectorise, and
# the forward's batched product needs no (r, r, N) element-wise temporary). Its code reads them through (N, .)
# views either way, and computes right in either layout (saved-tensor hooks may hand z back tokens first).
def _token_minor(num_experts: int, r: int) -> bool:
    """Whether the branch stores ``z``, the logits and the gates token-minor (the outer-product order)."""
    return num_experts <= r


def _stored_token_minor(t: torch.Tensor) -> torch.Tensor:
    """``(N, c) -> (N, c)``: the same values stored tokens last (a ``(c, N)`` tensor, returned as its transposed
    view)."""
    return t.t().contiguous().t()


def _mix_t(
    z_t: torch.Tensor, gates_t: torch.Tensor, cores: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``zT (r, N), gatesT (E, N), cores (E, r, r) -> mixedT (r, N)`` for ``E <= r``: ``m^T = S (g ⊗ z)^T`` with
    ``S[o, (e, i)] = M_e[o, i]``, one GEMM over ``K = E r``; also the temporaries :func:`_mix_t_backward` reuses,
    ``(outerT (E r, N), S (r, E r))`` (never saved for backward)."""
    num_experts, r_out, r_in = cores.shape
    n = z_t.shape[1]
    # a view when z and the gates are stored token-minor; a copy where saved-tensor hooks (e.g. offloading with
    # torch.autograd.graph.save_on_cpu) hand z back tokens first
    outer_t = (gates_t.unsqueeze(1) * z_t.unsqueeze(0)).reshape(num_experts * r_in, n)  # (E r, N)
    stacked = cores.transpose(0, 1).reshape(r_out, num_experts * r_in)  # S[o, (e, i)] = M_e[o, i]
    return stacked @ outer_t, (outer_t, stacked)


def _mix_t_backward(
    z_t: torch.Tensor,
    gates_t: torch.Tensor,
    cores: torch.Tensor,
    grad_m: torch.Tensor,
    parts: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_mix_t` w.r.t. ``zT (r, N)``, ``gatesT (E, N)`` and ``cores (E, r, r)``, from
    ``grad_m (N, r)`` (tokens first: the layout ``dL/d(mixed) = dL/d(delta) B`` comes in) and ``parts``."""
    num_experts, r_out, r_in = cores.shape
    outer_t, stacked = parts
    back = (stacked.t() @ grad_m.t().contiguous()).view(num_experts, r_in, -1)  # (E, r_in, N): M_e^T dm
    grad_z_t = (gates_t.unsqueeze(1) * back).sum(0)  # (r_in, N)
    grad_gates_t = (back * z_t.unsqueeze(0)).sum(1)  # (E, N)
    grad_c = outer_t @ grad_m  # (E r_in, r_out): C[(e, i), o] = M_e[o, i]
    return grad_z_t, grad_gates_t, grad_c.view(num_experts, r_in, r_out).transpose(1, 2)


def _branch_mix(
    z: torch.Tensor, gates: torch.Tensor, cores: torch.Tensor, token_minor: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``z (N, r), gates (N, E) -> mixed (N, r)`` (views of the stored layout) and the temporaries for backward."""
    if token_minor:
        mixed_t, parts = _mix_t(z.t(), gates.t(), cores)
        return mixed_t.t(), parts
    return _mix_parts(z, gates, cores)  # merged cores (E > r)


def _branch_mix_backward(
    z: torch.Tensor,
    gates: torch.Tensor,
    cores: torch.Tensor,
    grad_m: torch.Tensor,
    parts: tuple[torch.Tensor, ...],
    token_minor: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_branch_mix` w.r.t. ``z (N, r)``, ``gates (N, E)`` (views) and the cores."""
    if token_minor:
        grad_z_t, grad_gates_t, grad_cores = _mix_t_backward(z.t(), gates.t(), cores, grad_m, parts)
        return grad_z_t.t(), grad_gates_t.t(), grad_cores
    return _mix_backward(z, gates, cores, grad_m, parts)


def _core_logits(z: torch.Tensor, router_weight: torch.Tensor, token_minor: bool) -> torch.Tensor:
    """Core-space router logits ``(N, E)`` of ``z (N, r)``, stored as ``z`` is."""
    return (router_weight @ z.t()).t() if token_minor else z @ router_weight.t()


def _branch_codes(
    x: torch.Tensor,
    router_x: torch.Tensor | None,
    lora_A: torch.Tensor,
    router_weight: torch.Tensor,
    core_router: bool,
    token_minor: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat inputs ``(N, d_in)``; returns ``z (N, r)``, the logits ``(N, E)`` (stored token-minor if
    ``token_minor``) and what backward keeps to get them again: ``z`` alone for core-space routing (the logits
    are recomputed from it); for input routing the logits too (they cost a ``d_in`` matmul), as one
    ``[z, logits] (N, r + E)`` when one matmul gave both. The ``d_in``-wide products are computed tokens first
    (``W @ x.t()`` reads ``x`` transposed, up to 1.7x slower on CPU) and then stored token-minor."""
    r = lora_A.shape[0]
    store = _stored_token_minor if token_minor else (lambda t: t)
    if core_router:
        z = store(x @ lora_A.t())  # (N, r)
        return z, _core_logits(z, router_weight, token_minor), z, None
    if router_x is None:  # input routing on the same x: A and the router in one matmul
        z_logits = store(x @ torch.cat([lora_A, router_weight]).t())  # (N, r + E)
        return z_logits[:, :r], z_logits[:, r:], z_logits, None
    # input routing on x before dropout, A on the dropped-out x
    z, logits = store(x @ lora_A.t()), store(router_x @ router_weight.t())
    return z, logits, z, logits


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
    """``delta = s B (sum_e g_e M_e) A x`` with ``g = softmax_f32(W_g u)``, ``u = A x`` or ``x``: one node.

    Saves what LoRA saves (``x`` and ``z = A x``; for input routing ``[z, logits]`` and, with dropout, the
    router's input), recomputes probabilities and the mixture in backward. Per-token tensors are stored
    token-minor for ``E <= r`` (module docstring) and read through ``(N, .)`` views.
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
        token_minor = _token_minor(cores.shape[0], cores.shape[2])
        z, logits, kept, kept_logits = _branch_codes(
            x, router_x, lora_A, router_weight, core_router, token_minor
        )
        probs = softmax_f32(logits)  # (N, E) float32, stored as the logits are
        mixed, _ = _branch_mix(z, probs.to(z.dtype), cores, token_minor)  # (N, r), a fresh tensor
        delta = mixed.mul_(scaling) @ lora_B.t()  # (N, d_out): scaling applied on the small side
        ctx.scaling, ctx.core_router, ctx.has_router_x = scaling, core_router, router_x is not None
        ctx.autocast = _autocast_of(x)
        ctx.save_for_backward(x, router_x, kept, kept_logits, lora_A, router_weight, cores, lora_B)
        ctx.mark_non_differentiable(probs)
        return delta, probs

    @staticmethod
    @_with_forward_autocast
    def backward(ctx: Any, grad_delta: torch.Tensor, _grad_probs: torch.Tensor | None) -> tuple[Any, ...]:
        x, router_x, kept, logits, lora_A, router_weight, cores, lora_B = ctx.saved_tensors
        s, r = ctx.scaling, lora_A.shape[0]
        token_minor = _token_minor(cores.shape[0], cores.shape[2])
        if ctx.core_router:
            z = kept
            logits = _core_logits(z, router_weight, token_minor)  # recomputed
        elif logits is None:
            z, logits = kept[:, :r], kept[:, r:]
        else:
            z = kept
        probs = softmax_f32(logits)  # (N, E) float32
        gates = probs.to(z.dtype)
        grad_delta = grad_delta.to(z.dtype)
        mixed, parts = _branch_mix(z, gates, cores, token_minor)  # (N, r), recomputed
        grad_B = (grad_delta.t() @ mixed).mul_(s)  # (d_out, r)
        grad_mixed = (grad_delta @ lora_B).mul_(s)  # (N, r)
        grad_z, grad_gates, grad_cores = _branch_mix_backward(z, gates, cores, grad_mixed, parts, token_minor)
        grad_logits = _softmax_backward(grad_gates.to(probs.dtype), probs)
        grad_logits = grad_logits.to(logits.dtype)  # (N, E)
        grad_x = grad_router_x = None
        if ctx.core_router:
            grad_w = grad_logits.t() @ z  # (E, r)
            if token_minor:  # (N, r): mixing + routing, in grad_z's layout
                grad_z = torch.addmm(grad_z.t(), router_weight.t(), grad_logits.t()).t()
            else:
                grad_z = torch.addmm(grad_z, grad_logits, router_weight)
            grad_A = grad_z.t() @ x  # (r, d_in)
            if ctx.needs_input_grad[0]:
                grad_x = grad_z @ lora_A
        elif not ctx.has_router_x:
            if token_minor:  # (N, r + E), in their layout
                grad_z_logits = torch.cat([grad_z.t(), grad_logits.t()]).t()
            else:
                grad_z_logits = torch.cat([grad_z, grad_logits], dim=1)
            grad_a_w = grad_z_logits.t() @ x  # (r + E, d_in)
            grad_A, grad_w = grad_a_w[:r], grad_a_w[r:]
            if ctx.needs_input_grad[0]:
                grad_x = grad_z_logits @ torch.cat([lora_A, router_weight])
        else:
            grad_A, grad_w = grad_z.t() @ x, grad_logits.t() @ router_x
            if ctx.needs_input_grad[0]:
                grad_x = grad_z @ lora_A
            if ctx.needs_input_grad[1]:
                grad_router_x = grad_logits @ router_weight
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
