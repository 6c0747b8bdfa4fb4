"""FlyLoRA: implicit rank-wise mixture of experts (Zou et al., NeurIPS 2025).

Every rank of a LoRA is an expert; a frozen sparse random down projection ``A`` is at once the router and
the down projection. For every token::

    y = A dropout(x)                       # (..., r), A (r x d_in) frozen, p non-zeros per row
    S = top_k(y + b)                       # the k ranks with the largest biased (signed) activation
    h = W x + (alpha / r) * B (1_S * y)    # B (d_out x r) trained, zero at init

so only ``k`` columns of ``B`` act on a token and there is no router to train. ``b (r,)`` is a
load-balancing bias that only affects *which* ranks are selected (the values passed on are the unbiased
``y``) and is not trained by gradient.

``A``, as in the FlyLoRA paper and the authors' code: each row has ``p`` non-zeros at uniformly random
columns with values drawn from ``N(0, 1 / r^2)`` (std ``1 / r``). By default ``p = d_in // (r // top_k)``
(density about ``k / r``), the rule of the authors' experiment code (``p = weight.size(1) //
(r // top_k)``); ``a_density`` overrides it with ``p = round(a_density * d_in)``.

Selection (``selection``): ``"signed"`` (default) takes the top-k of ``y + b`` on the signed activations,
as the authors' experiment code does (FlyLoRA's ``peft/src/peft/tuners/lora/layer.py`` and the CoMoL
authors' ``src/flylora/layer.py``: ``torch.topk(activations + bias, top_k)``); ``"magnitude"`` takes the
top-k of ``|y + b|``, as FlyLoRA's minimal reference ``flylora.py`` does. Ties go to ``torch.topk``.

Balancing: following the auxiliary-loss-free balancing the paper adopts, each rank moves towards the mean
load::

    c_i  = number of tokens that selected rank i
    b_i <- b_i + u * sign(mean(c) - c_i)

The rule is the authors'; *when* it runs differs. The authors' code applies it inside every forward call,
on the tokens of that call: once per micro-batch (``G`` times per optimizer step with ``G`` accumulation
steps, and again for any recomputation), padding tokens included, and, in the experiment code, in eval mode
and under ``no_grad`` too (the minimal reference only when ``self.training``). Here the loads of the
non-padding tokens of every training-mode forward are summed since the last optimizer step and the rule is
applied once per step, in :meth:`FlyLoRALayer.after_optimizer_step`: ``b`` moves by at most ``u`` per
optimizer step (the authors' by up to ``G u``), evaluation never moves it, and counting a batch twice
(gradient-checkpointing recomputation doubles every ``c_i`` and ``mean(c)`` alike) changes nothing. Call
:func:`comol.mixture.after_optimizer_step` after each step, or register it once with
:func:`comol.mixture.register_step_hooks` (``comol train`` does).

``A`` and ``b`` are buffers: saved with the adapter (so a reloaded adapter selects exactly the same ranks)
but never trainable. The authors keep ``A`` in an ``nn.Linear`` applied under ``torch.no_grad()``, so in
their code no gradient reaches the layer input ``x`` through this branch; here it does (through the frozen
``A``), as the formula implies.
Trainable parameters per layer: ``d_out * r`` only; with ``r = 32`` that is what the CoMoL paper's
"r = 32 for parameter parity with LoRA r = 16" gives, although its tables print LoRA r = 16's figure for
FlyLoRA (see ``comol.params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from comol.mixture import MixtureConfig, MixtureLayer, MixtureModel, register_method
from comol.mixture.init import kaiming_linear_
from comol.mixture.registration import ComolPeftType

SELECTIONS = ("signed", "magnitude")


@dataclass
class FlyLoRAConfig(MixtureConfig):
    """Configuration of a FlyLoRA adapter.

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.flylora import FlyLoRAConfig
        >>> from comol.mixture import register_step_hooks
        >>> model = get_peft_model(base_model, FlyLoRAConfig(r=32, lora_alpha=32, top_k=8))  # doctest: +SKIP
        >>> register_step_hooks(optimizer, model)  # doctest: +SKIP
    """

    r: int = field(default=32, metadata={"help": "Rank r: the number of rank-wise experts."})
    lora_alpha: float = field(
        default=32, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."}
    )
    top_k: int = field(default=8, metadata={"help": "Ranks activated per token (1 <= top_k <= r)."})
    a_density: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of non-zero entries in each row of the frozen random A, in (0, 1]; None: the "
            "authors' d_in // (r // top_k) non-zeros per row."
        },
    )
    selection: str = field(
        default="signed",
        metadata={
            "help": "Rank selection: 'signed' = top_k(y + b) (the authors' experiment code), 'magnitude' = "
            "top_k(|y + b|) (FlyLoRA's minimal reference)."
        },
    )
    bias_update_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Step u of the load-balancing bias update b += u * sign(mean load - load) (0: off)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.FLYLORA
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.r:
            raise ValueError(f"top_k must be an integer between 1 and r={self.r}, got {self.top_k!r}.")
        if self.a_density is not None and not 0.0 < self.a_density <= 1.0:
            raise ValueError(f"a_density must be None or in (0, 1], got {self.a_density!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate!r}.")


def nonzeros_per_row(d_in: int, r: int, top_k: int, density: float | None = None) -> int:
    """Non-zeros ``p`` per row of ``A``: ``d_in // (r // top_k)`` (the authors' rule) when ``density`` is
    None, else ``round(density * d_in)``; at least 1."""
    if density is None:
        return max(1, d_in // (r // top_k))
    return max(1, round(density * d_in))


def sparse_random_projection(
    r: int, d_in: int, nnz: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A frozen FlyLoRA down projection.

    Args:
        r: rows (rank).
        d_in: columns (input features).
        nnz: non-zeros per row (see :func:`nonzeros_per_row`), in ``[1, d_in]``.
        generator: random generator (the global one if None).

    Returns:
        ``(r, d_in)`` float32, each row with exactly ``nnz`` non-zeros at uniformly random columns, drawn
        from ``N(0, 1 / r^2)``.
    """
    if not 1 <= nnz <= d_in:
        raise ValueError(f"nnz must be in [1, d_in={d_in}], got {nnz!r}.")
    columns = torch.rand(r, d_in, generator=generator).topk(nnz, dim=-1).indices  # (r, nnz)
    values = torch.randn(r, nnz, generator=generator) / r
    return torch.zeros(r, d_in).scatter_(-1, columns, values)


class FlyLoRALayer(MixtureLayer):
    """FlyLoRA layer. Per adapter: ``flylora_B`` (``nn.Linear(r, d_out)``, trained), and the buffers
    ``flylora_A (r, d_in)`` (frozen projection) and ``flylora_bias (r,)`` (balancing bias)."""

    prefix = "flylora_"
    module_parts = ("B",)
    other_param_names = ("flylora_A", "flylora_bias", "adapter_config", "scaling")

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.flylora_A = BufferDict({}, persistent=True)
        self.flylora_bias = BufferDict({}, persistent=True)
        self._load: dict[str, torch.Tensor] = {}  # (r,) tokens per rank since the last bias update

    def create_adapter(self, adapter_name: str, config: FlyLoRAConfig) -> None:
        self.flylora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False)
        self.flylora_A[adapter_name] = torch.zeros(config.r, self.in_features)
        self.flylora_bias[adapter_name] = torch.zeros(config.r)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: FlyLoRAConfig) -> None:
        if not self.get_base_layer().weight.is_meta:  # nothing to draw when only counting parameters
            nnz = nonzeros_per_row(self.in_features, config.r, config.top_k, config.a_density)
            self.flylora_A[adapter_name] = sparse_random_projection(config.r, self.in_features, nnz)
        self.flylora_bias[adapter_name].zero_()
        self._load.pop(adapter_name, None)
        if config.init_weights:  # A is the frozen sparse projection drawn above; B as in LoRA
            nn.init.zeros_(self.flylora_B[adapter_name].weight)
        else:
            kaiming_linear_(self.flylora_B[adapter_name].weight)

    def select_ranks(self, adapter_name: str, y: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask ``(..., r)`` float32 of the ``top_k`` ranks of codes ``y (..., r)``: the largest
        ``y + b`` (``selection="signed"``) or ``|y + b|`` (``"magnitude"``)."""
        config: FlyLoRAConfig = self.adapter_config[adapter_name]
        scores = y.detach().float() + self.flylora_bias[adapter_name].float()  # (..., r)
        if config.selection == "magnitude":
            scores = scores.abs()
        index = scores.topk(config.top_k, dim=-1).indices  # (..., k)
        return torch.zeros_like(scores).scatter_(-1, index, 1.0)

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: ``(alpha/r) B (1_S * (A dropout(x)))``."""
        config: FlyLoRAConfig = self.adapter_config[adapter_name]
        a = self.flylora_A[adapter_name].to(x.dtype)  # (r, d_in)
        y = torch.einsum("...i,ri->...r", self.adapter_dropout[adapter_name](x), a)  # (..., r)
        mask = self.select_ranks(adapter_name, y)  # (..., r) float32
        gates = mask / config.top_k  # rank load as gates summing to 1, for router statistics
        token_mask = self.context.token_mask(mask.shape[:-1])
        self.observe_routing(adapter_name, gates, gates, token_mask)
        if self.training and config.bias_update_rate > 0:
            self._count_load(adapter_name, mask, token_mask)
        return self.flylora_B[adapter_name](y * mask.to(y.dtype)) * self.scaling[adapter_name]

    @torch.no_grad()
    def _count_load(self, adapter_name: str, mask: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        flat = mask.reshape(-1, mask.shape[-1])  # (N, r)
        if token_mask is not None:
            flat = flat[token_mask.reshape(-1)]
        counts = flat.sum(0)  # (r,)
        previous = self._load.get(adapter_name)
        self._load[adapter_name] = counts if previous is None else previous + counts

    def after_optimizer_step(self, adapter_name: str) -> None:
        self.update_bias(adapter_name)

    @torch.no_grad()
    def update_bias(self, adapter_name: str) -> None:
        """Apply ``b += u * sign(mean(c) - c)`` with the loads ``c`` counted since the last call, then reset them.

        Under data parallelism (DDP, FSDP, DeepSpeed) ``c`` is summed over all processes first, so that every
        process takes the same step from the loads of the whole global batch.
        """
        load = self._load.pop(adapter_name, None)
        if adapter_name not in self.flylora_bias:
            return
        bias = self.flylora_bias[adapter_name]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every process calls this after every optimizer step; one that saw no token adds zeros.
            load = torch.zeros(bias.shape, device=bias.device) if load is None else load.float()
            dist.all_reduce(load)
        if load is None:
            return
        step = self.adapter_config[adapter_name].bias_update_rate * torch.sign(load.mean() - load)
        bias.add_(step.to(bias))

    def static_gates(self, adapter_name: str) -> torch.Tensor | None:
        config = self.adapter_config[adapter_name]
        return torch.ones(config.r) if config.top_k == config.r else None  # every rank always active

    def merge_blocker(self, adapter_name: str) -> str | None:
        if self.static_gates(adapter_name) is not None:
            return None
        config = self.adapter_config[adapter_name]
        return (
            f"adapter {adapter_name!r} activates a different set of top_k={config.top_k} of r={config.r} ranks for "
            "each token, so its update depends on the input and cannot be folded into the base weights."
        )

    def fixed_gate_lora(
        self, adapter_name: str, gates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA ``(A, B diag(gates) * scaling)`` for a fixed rank weighting ``gates (r,)`` (all ones: k = r)."""
        a = self.flylora_A[adapter_name]  # (r, d_in)
        b = self.flylora_B[adapter_name].weight  # (d_out, r)
        gates = self.check_fixed_gates(adapter_name, gates, a.shape[0])
        return a.to(b.dtype), b * gates.to(b) * self.scaling[adapter_name]


class FlyLoRAModel(MixtureModel):
    """peft tuner for FlyLoRA (use through ``peft.get_peft_model(model, FlyLoRAConfig(...))``).

    The balancing bias is updated by :func:`comol.mixture.after_optimizer_step` (``comol train`` registers
    it as an optimizer step hook with :func:`comol.mixture.register_step_hooks`).
    """

    prefix = "flylora_"
    tuner_layer_cls = FlyLoRALayer


register_method("flylora", FlyLoRAConfig, FlyLoRAModel)
