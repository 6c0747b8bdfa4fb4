"""The construction: shared orthonormal bases and per-expert cores from stacked LoRA factors, and
:func:`compose_loras`, which puts the result on a base model as a CoMoL adapter (see :mod:`comol.composition`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from comol.composition.loras import CompositionError, LoraFactors, check_base_shapes, read_lora
from comol.methods.comol import CoMoLConfig
from comol.mixture.model import mixture_layers

logger = logging.getLogger(__name__)

ROUTER_INITS = ("uniform", "arrow")
_RESERVED_OPTIONS = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "num_experts",
        "target_modules",
        "core_router",
        "peft_type",
        "task_type",
    }
)


@dataclass
class CompositionReport:
    """What :func:`compose_loras` built and how exact it is.

    Attributes:
        rank: the composed adapter's ``r``.
        sources: the LoRAs, in expert order.
        errors: ``{module: [relative error of expert e]}``; 0 where expert ``e`` does not adapt the module.
        stack_ranks: ``{module: R0}``, the summed LoRA ranks of each module.
    """

    rank: int
    sources: list[str]
    errors: dict[str, list[float]] = field(default_factory=dict)
    stack_ranks: dict[str, int] = field(default_factory=dict)

    def max_errors(self) -> list[float]:
        """Per expert, the largest relative error over modules."""
        return [
            max((errs[e] for errs in self.errors.values()), default=0.0) for e in range(len(self.sources))
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "sources": self.sources,
            "max_relative_error": self.max_errors(),
            "relative_errors": self.errors,
            "stack_ranks": self.stack_ranks,
        }


@dataclass
class ComposedModule:
    """One module of the composed adapter.

    Attributes:
        A: ``(R, d_in)`` shared down-projection with orthonormal rows (zero-padded).
        B: ``(d_out, R)`` shared up-projection with orthonormal columns (zero-padded).
        cores: ``(E, R, R)``, ``M_e[out, in]``, each LoRA's scaling included.
        errors: ``(E,)`` relative Frobenius errors of ``B M_e A`` against ``dW_e``.
        stack_rank: ``R0``, the summed rank of the LoRAs adapting the module.
    """

    A: torch.Tensor
    B: torch.Tensor
    cores: torch.Tensor
    errors: torch.Tensor
    stack_rank: int


def stack_rank(loras: Sequence[LoraFactors], module: str) -> int:
    """``min(R0, d_in, d_out)`` of ``module``: the rank at which its composition is exact."""
    present = [lora.modules[module] for lora in loras if module in lora.modules]
    a, b, _ = present[0]
    return min(sum(p[0].shape[0] for p in present), a.shape[1], b.shape[0])


def compose_module(loras: Sequence[LoraFactors], module: str, rank: int) -> ComposedModule:
    """The shared bases, cores and errors of ``module`` at rank ``rank`` (computed in float64)."""
    experts = [e for e, lora in enumerate(loras) if module in lora.modules]
    factors = [  # (A_e, B_e, s_e) in float64 on the CPU
        (a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64), s)
        for a, b, s in (loras[e].modules[module] for e in experts)
    ]
    a_stack = torch.cat([a for a, _, _ in factors], dim=0)  # (R0, d_in)
    b_stack = torch.cat([s * b for _, b, s in factors], dim=1)  # (d_out, R0)
    _, _, vh_a = torch.linalg.svd(a_stack, full_matrices=False)  # (k_A, d_in)
    u_b, _, _ = torch.linalg.svd(b_stack, full_matrices=False)  # (d_out, k_B)
    d_out, d_in = b_stack.shape[0], a_stack.shape[1]
    num_experts = len(loras)
    shared_a = torch.zeros(rank, d_in, dtype=torch.float64)
    shared_b = torch.zeros(d_out, rank, dtype=torch.float64)
    keep_a, keep_b = min(rank, vh_a.shape[0]), min(rank, u_b.shape[1])
    shared_a[:keep_a] = vh_a[:keep_a]
    shared_b[:, :keep_b] = u_b[:, :keep_b]
    cores = torch.zeros(num_experts, rank, rank, dtype=torch.float64)
    errors = torch.zeros(num_experts, dtype=torch.float64)
    for e, (a, b, s) in zip(experts, factors, strict=True):
        full = torch.einsum("ok,or,ri,id->kd", u_b, s * b, a, vh_a.T)  # (k_B, k_A), U_B^T dW_e V_A
        kept = full[:keep_b, :keep_a]
        cores[e, :keep_b, :keep_a] = kept
        total = full.square().sum()
        lost = full[keep_b:].square().sum() + full[:keep_b, keep_a:].square().sum()  # the discarded entries
        errors[e] = (lost / total).sqrt() if total > 0 else 0.0
    if not (torch.isfinite(cores).all() and torch.isfinite(errors).all()):
        raise CompositionError(f"module {module}: the composition is not finite (non-finite LoRA weights?).")
    return ComposedModule(shared_a, shared_b, cores, errors, sum(a.shape[0] for a, _, _ in factors))


def arrow_router(cores: torch.Tensor) -> torch.Tensor:
    """``(E, R)`` core-space router rows: each expert's top right singular vector of its core ``(E, R, R)``.

    At full rank ``V_A w_e`` is the top right singular vector of ``dW_e``, Arrow's prototype, and
    ``w_e . z = v_e . x`` for ``z = A x``. The sign of a singular vector is arbitrary and a linear router
    cannot compute Arrow's ``|v_e . x|``; the sign is fixed so that the largest entry of ``w_e`` is positive.
    An expert with a zero core gets a zero row.
    """
    rows = torch.zeros(cores.shape[0], cores.shape[2], dtype=cores.dtype)
    for e, core in enumerate(cores):
        if not core.any():
            continue
        _, _, vh = torch.linalg.svd(core)
        top = vh[0]  # (R,)
        rows[e] = top * torch.sign(top[top.abs().argmax()])
    return rows


def compose_loras(
    base_model: nn.Module,
    adapters: Sequence[str | os.PathLike | PeftModel],
    rank: int | None = None,
    core_router: bool = True,
    router_init: str = "uniform",
    adapter_name: str = "default",
    **options: Any,
) -> PeftModel:
    """A CoMoL adapter whose experts are the given LoRAs, on ``base_model``.

    Args:
        base_model: the transformers model the LoRAs were trained on (not a ``PeftModel``); it is wrapped in
            place, as ``peft.get_peft_model`` does.
        adapters: LoRA adapter directories, hub ids or loaded ``PeftModel``s (their active adapter), one per
            expert. They may differ in rank, alpha, rsLoRA and target modules.
        rank: the composed ``r``; None: the smallest rank that is exact for every module.
        core_router: route on ``z = A x`` (router ``E x R``); False: on ``x`` (``E x d_in``).
        router_init: ``"uniform"`` (router at zero: every token gets ``1/E``, i.e. the mean of the LoRA
            updates) or ``"arrow"`` (each expert's router row is its top right singular direction, see
            :func:`arrow_router`).
        adapter_name: name of the CoMoL adapter.
        **options: other :class:`comol.CoMoLConfig` fields (``router_top_k``, ``lora_dropout``, ...).

    Returns:
        The ``PeftModel``. Its attribute ``comol_composition`` is the :class:`CompositionReport` (per module and
        expert relative errors). Save it with ``save_pretrained``; ``PeftModel.from_pretrained`` loads it
        after ``import comol``.

    Raises:
        CompositionError: a LoRA cannot be composed exactly (DoRA, bias training, other base shapes,
            non-Linear targets, unsupported options); the message names the adapter.
        ValueError: bad arguments.
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}.")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    reserved = sorted(set(options) & _RESERVED_OPTIONS)
    if reserved:
        raise ValueError(f"compose_loras sets {reserved} itself; remove them from the options.")
    if isinstance(base_model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in base_model.modules()):
        raise ValueError(
            "base_model already holds adapters; pass the plain base model (e.g. model.unload())."
        )
    if not adapters:
        raise ValueError("adapters is empty; give at least one LoRA.")
    loras = [
        read_lora(source, None if isinstance(source, str | os.PathLike) else f"adapters[{i}]")
        for i, source in enumerate(adapters)
    ]
    check_base_shapes(base_model, loras)
    task_types = {lora.task_type for lora in loras}
    if len(task_types) > 1:
        raise CompositionError(f"the LoRAs have different task types {sorted(map(str, task_types))}.")
    module_names = sorted({name for lora in loras for name in lora.modules})
    exact_rank = max(stack_rank(loras, name) for name in module_names)
    rank = exact_rank if rank is None else rank
    composed = {name: compose_module(loras, name, rank) for name in module_names}

    config = CoMoLConfig(
        r=rank,
        lora_alpha=rank,
        num_experts=len(loras),
        core_router=core_router,
        target_modules=module_names,
        task_type=task_types.pop(),
        base_model_name_or_path=getattr(getattr(base_model, "config", None), "_name_or_path", None),
        **options,
    )
    peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, layer in mixture_layers(peft_model).items():
            part = composed[name.removeprefix("base_model.model.")]
            layer.comol_A[adapter_name].weight.copy_(part.A)
            layer.comol_B[adapter_name].weight.copy_(part.B)
            layer.comol_cores[adapter_name].copy_(part.cores)
            router = layer.comol_router[adapter_name].weight  # (E, R) or (E, d_in)
            if router_init == "uniform":
                router.zero_()
            else:
                rows = arrow_router(part.cores)  # (E, R)
                router.copy_(rows if core_router else rows @ part.A)
    report = CompositionReport(
        rank=rank,
        sources=[lora.label for lora in loras],
        errors={name: part.errors.tolist() for name, part in composed.items()},
        stack_ranks={name: part.stack_rank for name, part in composed.items()},
    )
    peft_model.comol_composition = report
    worst = max(report.max_errors())
    logger.info(
        "Composed %d LoRAs into CoMoL r=%d (exact at r=%d) on %d modules; largest relative error %.3g.",
        len(loras), rank, exact_rank, len(module_names), worst,
    )  # fmt: skip
    return peft_model
