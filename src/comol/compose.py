"""Build a CoMoL adapter from a library of trained LoRAs (core-space composition), and take one apart.

Per adapted module, for LoRAs ``e = 1..E`` with ``A_e (r_e x d_in)``, ``B_e (d_out x r_e)`` and scaling ``s_e``
(``alpha / r_e``, or ``alpha / sqrt(r_e)`` with rsLoRA), so that ``dW_e = s_e B_e A_e``:

* stack ``A = [A_1; ...; A_E]`` (``R0 x d_in``, ``R0 = sum_e r_e``) and ``B = [s_1 B_1, ..., s_E B_E]``
  (``d_out x R0``);
* orthonormal bases from thin SVDs ``A = U_A S_A V_A^T`` and ``B = U_B S_B V_B^T``; the CoMoL adapter's shared
  ``A := V_A^T`` (``R x d_in``) and ``B := U_B`` (``d_out x R``);
* the core of expert ``e``: ``M_e = U_B^T dW_e V_A = (U_B^T s_e B_e) (A_e V_A)`` (``R x R``), so that
  ``U_B M_e V_A^T = dW_e``.

At ``R >= rank`` of both stacks this is exact: gated one-hot to expert ``e``, the layer *is* LoRA ``e``. With a
smaller ``R`` the leading singular directions of each stack are kept, and the relative error
``||dW_e - U_B' M_e' V_A'^T||_F / ||dW_e||_F`` is the norm of the core entries that fall outside the kept
``R x R`` block (the full bases represent ``dW_e`` exactly and are orthonormal). No ``d_out x d_in`` matrix is
ever formed. A module that a LoRA does not adapt gets a zero core for it; modules have ``R`` rows padded with
zeros where their stacks have smaller rank. The composed adapter has ``lora_alpha = r`` (scaling 1): each
LoRA's scaling is folded into its cores.

The reverse, :func:`decompose`, writes expert ``e`` of a mixture adapter as the standalone LoRA ``B M_e A``
(through the layer's ``fixed_gate_lora`` with a one-hot gate), optionally at a lower rank by an exact
truncated SVD of that product.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from comol.export import _peft_key, _write_adapter_dir
from comol.methods.comol import CoMoLConfig
from comol.mixture.model import mixture_layers

logger = logging.getLogger(__name__)

ROUTER_INITS = ("uniform", "arrow")
# LoraConfig fields that do not change what a trained LoRA computes (or are only read while loading it).
_HARMLESS_FIELDS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
        "fan_in_fan_out", "use_rslora", "layers_to_transform", "layers_pattern", "rank_pattern",
        "alpha_pattern", "init_lora_weights", "runtime_config", "megatron_core", "qalora_group_size",
        "eva_config",
    }
)  # fmt: skip
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, CorDA, LoftQ rewrite them).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Options of compose_loras that the construction itself sets.
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
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class CompositionError(ValueError):
    """A LoRA cannot be composed exactly; the message names the adapter and the reason."""


@dataclass
class LoraFactors:
    """One LoRA's factors per adapted module.

    Attributes:
        label: the adapter's name in messages (its directory, hub id or ``adapters[i]``).
        modules: ``{module name: (A (r_e, d_in), B (d_out, r_e), scaling s_e)}``, names as in the base model's
            ``named_modules()``.
        task_type: the LoRA's peft task type.
    """

    label: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    task_type: str | None = None


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


# --------------------------------------------------------------------------------------------------
# Reading and checking the LoRAs
# --------------------------------------------------------------------------------------------------
def check_lora_config(config: PeftConfig, label: str) -> LoraConfig:
    """The config if a LoRA with it can be composed exactly, else :class:`CompositionError` saying why."""
    if not isinstance(config, LoraConfig):
        raise CompositionError(f"{label}: is a {config.peft_type} adapter, not a LoRA; only LoRAs compose.")
    if config.use_dora:
        raise CompositionError(
            f"{label}: is a DoRA adapter (use_dora=True); its magnitude vector rescales W + BA per column, "
            "which is not a low-rank update, so it cannot be composed."
        )
    if config.bias != "none" or config.lora_bias:
        raise CompositionError(
            f"{label}: trains biases (bias={config.bias!r}, lora_bias={config.lora_bias}); a bias is not a "
            "low-rank update of W and cannot be routed in core space."
        )
    if config.modules_to_save or config.trainable_token_indices:
        raise CompositionError(
            f"{label}: also trains whole modules or token embeddings (modules_to_save={config.modules_to_save}, "
            f"trainable_token_indices={config.trainable_token_indices}); those cannot be composed."
        )
    if config.init_lora_weights not in _SAFE_INITS:
        raise CompositionError(
            f"{label}: init_lora_weights={config.init_lora_weights!r} rewrites the base weights (PiSSA, OLoRA, "
            "CorDA and LoftQ do), so the LoRA is not an update of the shared base model."
        )
    defaults = LoraConfig()
    for f in fields(LoraConfig):
        if f.name in _HARMLESS_FIELDS:
            continue
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name):
            raise CompositionError(
                f"{label}: option {f.name}={value!r} is not supported by composition (only plain LoRAs on "
                "Linear layers, with any rank, alpha, rsLoRA and target modules, compose exactly)."
            )
    return config


def read_lora(source: str | os.PathLike | PeftModel, label: str | None = None) -> LoraFactors:
    """Read one LoRA: an adapter directory, a hub id, or a loaded ``PeftModel`` (its active adapter).

    Raises:
        CompositionError: the adapter is not a plain LoRA of Linear layers (see :func:`check_lora_config`).
    """
    if isinstance(source, PeftModel):
        return _read_loaded_lora(source, label or f"PeftModel({source.active_adapter!r})")
    label = label or str(source)
    try:
        config = PeftConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise CompositionError(f"{label}: cannot read adapter_config.json ({err}).") from err
    config = check_lora_config(config, label)
    weights = load_peft_weights(str(source), device="cpu")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = sorted((key for key in weights if _KEY.match(key) is None), key=_severity)
    if unexpected:
        raise CompositionError(f"{label}: {_unexpected_tensor(unexpected[0])}")
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if tensor.ndim != 2:
            raise CompositionError(
                f"{label}: {key} has shape {tuple(tensor.shape)}; only LoRAs of Linear layers compose."
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    modules = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise CompositionError(
                f"{label}: module {module} has only {sorted(pair)} in the adapter weights."
            )
        a, b = pair["lora_A"], pair["lora_B"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        if a.shape[0] != r or b.shape[1] != r:
            raise CompositionError(
                f"{label}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but its config "
                f"gives rank {r}; the adapter files disagree."
            )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[module] = (a, b, scaling)
    if not modules:
        raise CompositionError(f"{label}: the adapter has no LoRA weights.")
    return LoraFactors(label, modules, _task_type(config))


def _severity(key: str) -> int:
    """Order of the reasons to report: the most specific first."""
    return next((i for i, marker in enumerate(_MARKERS) if marker in key), len(_MARKERS))


_MARKERS = ("lora_magnitude_vector", "lora_embedding", ".bias")


def _unexpected_tensor(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"holds a DoRA magnitude vector ({key}); DoRA cannot be composed."
    if "lora_embedding" in key:
        return f"adapts an embedding ({key}); only LoRAs of Linear layers compose."
    if key.endswith(".bias"):
        return f"trains a bias ({key}); biases cannot be composed."
    return f"holds a tensor that is not a LoRA factor ({key}); only plain LoRAs compose."


def _read_loaded_lora(model: PeftModel, label: str) -> LoraFactors:
    name = model.active_adapter
    config = check_lora_config(model.peft_config[name], label)
    modules = {}
    for module_name, module in model.base_model.model.named_modules():
        if not isinstance(module, BaseTunerLayer) or name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLayer) or not isinstance(module.lora_A[name], nn.Linear):
            raise CompositionError(
                f"{label}: {module_name} is a {type(module).__name__}; only Linear LoRAs compose."
            )
        modules[module_name] = (
            module.lora_A[name].weight.detach(),
            module.lora_B[name].weight.detach(),
            float(module.scaling[name]),
        )
    if not modules:
        raise CompositionError(f"{label}: the model has no LoRA layers for adapter {name!r}.")
    return LoraFactors(label, modules, _task_type(config))


def _task_type(config: PeftConfig) -> str | None:
    task = config.task_type
    return None if task is None else str(getattr(task, "value", task))


def check_base_shapes(base_model: nn.Module, loras: Sequence[LoraFactors]) -> None:
    """Every LoRA module exists in ``base_model`` as a Linear (or Conv1D) of the LoRA's shape.

    Raises:
        CompositionError: naming the adapter, the module and the mismatch.
    """
    modules = dict(base_model.named_modules())
    for lora in loras:
        for name, (a, b, _) in lora.modules.items():
            base = modules.get(name)
            if base is None:
                raise CompositionError(f"{lora.label}: adapts {name}, which the base model does not have.")
            if not isinstance(base, nn.Linear | Conv1D):
                raise CompositionError(
                    f"{lora.label}: adapts {name}, a {type(base).__name__}; only Linear targets compose."
                )
            d_in, d_out = _get_in_out_features(base)
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise CompositionError(
                    f"{lora.label}: {name} is d_out x d_in = {b.shape[0]} x {a.shape[1]} in the LoRA but "
                    f"{d_out} x {d_in} in the base model; the LoRA was trained on a different base model."
                )


# --------------------------------------------------------------------------------------------------
# The construction
# --------------------------------------------------------------------------------------------------
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
    factors = [
        tuple(t.double() if isinstance(t, torch.Tensor) else t for t in loras[e].modules[module])
        for e in experts
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


# --------------------------------------------------------------------------------------------------
# The reverse
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraAdapter:
    """A standalone LoRA taken out of a mixture adapter.

    Attributes:
        config: its ``LoraConfig`` (scaling 1: ``lora_alpha == r``, the scaling is folded into ``lora_B``).
        state_dict: ``{peft key: tensor}`` as peft saves it (``...q_proj.lora_A.weight``).
        errors: ``{module: relative Frobenius error}`` of the rank truncation (0 at the mixture's rank).
    """

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    errors: dict[str, float]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically) into ``directory``."""
        _write_adapter_dir(Path(directory), self.config, self.state_dict)


def truncate_lora(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` LoRA of ``b @ a`` and its relative Frobenius error, without forming ``b @ a``.

    Args:
        a: ``(r, d_in)``.
        b: ``(d_out, r)``.
        rank: target rank ``k``.

    Returns:
        ``(a' (k, d_in), b' (d_out, k), error)``, error ``= sqrt(sum of discarded sigma^2 / sum sigma^2)``.
    """
    q_b, r_b = torch.linalg.qr(b)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the r x r core of b @ a in orthonormal bases
    total = s.square().sum()
    error = float((s[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return vh[:rank] @ q_a.T, q_b @ (u[:, :rank] * s[:rank]), error


@torch.no_grad()
def decompose(model: nn.Module, rank: int | None = None, adapter_name: str = "default") -> list[LoraAdapter]:
    """Every expert of a mixture adapter as a standalone LoRA: expert ``e`` is ``B M_e A`` for CoMoL.

    Args:
        model: a ``PeftModel`` with a routed comol adapter (one whose layers support ``fixed_gate_lora``).
        rank: rank of the LoRAs; None: the adapter's ``r`` (exact). A smaller rank truncates each module's
            update by SVD (the best approximation of that rank) and reports its error.
        adapter_name: which adapter.

    Returns:
        One :class:`LoraAdapter` per expert. A module whose update for an expert is exactly zero (e.g. a
        composed LoRA that did not adapt it) is left out of that expert's LoRA.
    """
    layers = {n: m for n, m in mixture_layers(model).items() if adapter_name in m.adapter_config}
    if not layers:
        raise ValueError(f"No comol layer holds an adapter named {adapter_name!r}.")
    source_config = next(iter(layers.values())).adapter_config[adapter_name]
    num_experts = getattr(source_config, "num_experts", None)
    if num_experts is None:
        raise ValueError(f"Adapter {adapter_name!r} ({source_config.peft_type}) has no experts to decompose.")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    adapters = []
    for e in range(num_experts):
        gates = torch.zeros(num_experts)
        gates[e] = 1.0
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        ranks: dict[str, int] = {}
        fan_in_fan_out = False
        for name, layer in layers.items():
            a, b = layer.fixed_gate_lora(adapter_name, gates)  # (r, d_in), (d_out, r)
            if not b.any() or not a.any():
                continue
            module = name.removeprefix("base_model.model.")
            error = 0.0
            if rank is not None and rank < a.shape[0]:
                a64, b64, error = truncate_lora(a.double(), b.double(), rank)
                a, b = a64.to(a.dtype), b64.to(b.dtype)
            key = _peft_key(name)
            tensors[f"{key}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().cpu().contiguous()
            errors[module], ranks[module] = error, a.shape[0]
            fan_in_fan_out = fan_in_fan_out or layer.is_conv1d
        if not ranks:
            raise ValueError(f"Expert {e} of adapter {adapter_name!r} is zero in every layer.")
        r = max(ranks.values())
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=sorted(ranks),
            rank_pattern={k: v for k, v in ranks.items() if v != r},
            alpha_pattern={k: v for k, v in ranks.items() if v != r},
            fan_in_fan_out=fan_in_fan_out,
            base_model_name_or_path=source_config.base_model_name_or_path,
            task_type=source_config.task_type,
        )
        adapters.append(LoraAdapter(config, tensors, errors))
    return adapters
