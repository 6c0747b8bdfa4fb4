"""SparseMoA: a heterogeneous mixture of adapters with sparse, threshold-gated routing (Cao et al., 2025,
"MoA: Heterogeneous Mixture of Adapters for Parameter-Efficient Fine-Tuning of LLMs", arXiv 2506.05928).

Unlike the other methods, SparseMoA routes once per decoder block, not once per linear layer, and its
experts differ in structure: one LoRA on every adapted linear layer of the block (q, k, v, o, down by
default) and one parallel adapter beside the block's MLP. One router per block reads the input ``u`` of
its attention module (the normalised block input) and gates all ``E`` experts with independent sigmoids;
an expert whose gate falls below a token-dependent threshold is skipped for that token::

    p = sigmoid(W_3 (silu(W_1 u + b_1) * (W_2 u + b_2)) + b_3)   # (..., E) float32, SwiGLU router
    tau = tau_max * sigmoid(w_tau . u + b_tau)                    # (..., 1), tau_max = 0.5
    g_e = p_e [p_e >= tau]                                        # Soft MoA (sparse=False): g_e = p_e
    linear e:          h = W x + g_e (alpha / r) B_e A_e dropout(x)
    parallel adapter:  y = mlp(v) + g_E (U silu(D v + d) + u_b)   # v: the MLP's input, D: (a, d)

``E`` = adapted linear layers in the block + 1 (the parallel adapter). The router's hidden width is
``router_hidden_factor * E`` (4 E in MoA's setting; 0 gives a linear router ``d -> E``).

The indicator ``[p_e >= tau]`` has no gradient, so the threshold network only decides which experts run;
as in the MoA authors' implementation its parameters are trainable but receive a zero gradient (they are
kept in the autograd graph so that DDP and FSDP see every trainable parameter used). The CoMoL paper counts
them in its "Param" column: with r = 8, a = 16 and the paper's targets this module gives 24.49M (Qwen3-8B)
and 34.50M (Qwen3-14B), its Tables 2 and 3.

Experts are computed densely and multiplied by their gate (zero for skipped tokens): with rank-8 LoRA
experts the gather/scatter of a token-sparse dispatch costs more than it saves, and the result is the same.

Initialisation: LoRA ``A`` Kaiming-uniform and ``B = 0``, the parallel adapter's down projection
Kaiming-uniform and its up projection zero (so the adapted model starts as the base model; MoA's reference
code instead starts both projections at Xavier with gain 1e-4, i.e. almost zero), router biases zero.

Trainable parameters per decoder block: ``sum_e r (d_in,e + d_out,e)`` (LoRA experts) ``+ 2 d a + a + d``
(parallel adapter) ``+ 2 (d H + H) + H E + E`` (router, ``H = factor E``) ``+ d + 1`` (threshold).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import init_empty_weights
from torch import nn
from torch.utils.hooks import RemovableHandle

from comol.mixture import MixtureConfig, MixtureLayer, MixtureModel, register_method
from comol.mixture.observe import RoutingContext, RoutingObserver
from comol.mixture.registration import ComolPeftType

BLOCK_ATTR = "moa_block"
"""Name under which each decoder block holds its :class:`SparseMoABlock`. It must not contain the method prefix
``sparsemoa_``: transformers' ``load_adapter`` inserts the adapter name after the first name that does."""


@dataclass
class SparseMoAConfig(MixtureConfig):
    """Configuration of a SparseMoA adapter (the CoMoL paper's setting: ``r=8, lora_alpha=8``).

    Example:
        >>> from peft import get_peft_model
        >>> from comol.methods.sparsemoa import SparseMoAConfig
        >>> model = get_peft_model(base_model, SparseMoAConfig(r=8, lora_alpha=8))  # doctest: +SKIP
    """

    parallel_adapter_size: int = field(
        default=16,
        metadata={
            "help": "Bottleneck a of the parallel-adapter expert beside each block's MLP (d -> a -> d with SiLU "
            "and biases). 0: LoRA experts only."
        },
    )
    router_hidden_factor: int = field(
        default=4,
        metadata={
            "help": "The router is a SwiGLU d -> factor*E -> E with biases (MoA's setting: 4). 0: a linear "
            "router d -> E."
        },
    )
    max_threshold: float = field(
        default=0.5,
        metadata={
            "help": "tau_max: the per-token threshold is tau_max * sigmoid(w . u + b); experts whose sigmoid gate "
            "is below it are skipped for that token."
        },
    )
    sparse: bool = field(
        default=True,
        metadata={
            "help": "True: Sparse MoA (threshold-gated experts). False: Soft MoA (every expert weighted by its "
            "sigmoid gate, no threshold network)."
        },
    )
    router_input_module: str | None = field(
        default=None,
        metadata={
            "help": "Child of each decoder block whose input the router reads. None: the first child holding an "
            "adapted layer (the attention module for the default targets; its input is the normalised block "
            "input)."
        },
    )
    mlp_module: str = field(
        default="mlp",
        metadata={
            "help": "Child of each decoder block the parallel adapter runs beside: it reads the MLP's input and "
            "adds to its output."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.SPARSEMOA
        for name in ("parallel_adapter_size", "router_hidden_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not 0 < self.max_threshold <= 1:
            raise ValueError(
                f"max_threshold must be in (0, 1] (gates are sigmoids), got {self.max_threshold!r}."
            )
        if not self.mlp_module:
            raise ValueError("mlp_module must name the MLP child of each decoder block, e.g. 'mlp'.")


def block_key(module_key: str) -> str:
    """The decoder block a module belongs to: its name up to the first numeric index.

    ``"model.layers.3.self_attn.q_proj"`` -> ``"model.layers.3"``; ``"transformer.h.0.attn.c_attn"`` ->
    ``"transformer.h.0"``.
    """
    match = re.match(r"^(.*?\.\d+)\.", module_key)
    if match is None:
        raise ValueError(
            f"SparseMoA routes once per decoder block, but {module_key!r} is not inside a numbered block "
            "(a module name like 'model.layers.<i>.self_attn.q_proj'). Target linear layers of the decoder blocks."
        )
    return match.group(1)


def _hidden_states(args: tuple, kwargs: dict[str, Any], where: str) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"SparseMoA reads the hidden states of {where} from its first argument or its 'hidden_states' "
            f"keyword, but got {type(hidden).__name__}. Set router_input_module / mlp_module to modules called "
            "with the hidden states."
        )
    return hidden


class BlockGates:
    """The gates of one block's experts in the current forward: written by the block's router, read by its
    experts. A plain object (not a module), so it is neither a submodule nor saved.

    Args:
        block_key: the decoder block's module name, for error messages.
    """

    def __init__(self, block_key: str) -> None:
        self.block_key = block_key
        self.gates: dict[str, torch.Tensor] = {}  # adapter -> (..., E) float32

    def column(self, adapter_name: str, index: int, leading_shape: torch.Size, reader: str) -> torch.Tensor:
        """Gate ``(..., 1)`` of expert ``index`` for tokens of ``leading_shape``."""
        gates = self.gates.get(adapter_name)
        if gates is None or tuple(gates.shape[:-1]) != tuple(leading_shape):
            raise RuntimeError(
                f"{reader}: this SparseMoA expert has no gates from the router of its block {self.block_key!r} for "
                f"these tokens. The router runs when the block's router input module is called; call the whole "
                "decoder block (or model), not an adapted layer on its own."
            )
        return gates[..., index : index + 1]


class SparseMoALayer(MixtureLayer):
    """A LoRA expert of SparseMoA: ``sparsemoa_A`` (``nn.Linear(d_in, r)``) and ``sparsemoa_B``
    (``nn.Linear(r, d_out)``) per adapter; its gate is column ``gate_index[adapter]`` of its block's gates."""

    prefix = "sparsemoa_"
    module_parts = ("A", "B")
    other_param_names = (*MixtureLayer.other_param_names, "gate_index")

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.gate_index: dict[str, int] = {}
        self.block_gates: BlockGates | None = None  # set by the tuner once the blocks exist

    def create_adapter(self, adapter_name: str, config: SparseMoAConfig) -> None:
        self.sparsemoa_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False)
        self.sparsemoa_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: SparseMoAConfig) -> None:
        nn.init.kaiming_uniform_(self.sparsemoa_A[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.sparsemoa_B[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.sparsemoa_B[adapter_name].weight, a=math.sqrt(5))

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: ``g_e (alpha/r) B A dropout(x)`` with this expert's gate ``g_e``."""
        if self.block_gates is None or adapter_name not in self.gate_index:
            raise RuntimeError(
                f"{self.module_key}: SparseMoA layer used outside its tuner (no block router)."
            )
        gate = self.block_gates.column(
            adapter_name, self.gate_index[adapter_name], x.shape[:-1], self.module_key or "SparseMoA"
        )  # (..., 1) float32
        z = self.sparsemoa_A[adapter_name](self.adapter_dropout[adapter_name](x))  # (..., r)
        out = self.sparsemoa_B[adapter_name](z) * self.scaling[adapter_name]  # (..., d_out)
        return out * gate.to(out.dtype)

    def merge_blocker(self, adapter_name: str) -> str | None:
        return (
            f"adapter {adapter_name!r} gates this expert per token (router and threshold of its decoder block), "
            "so its update depends on the input and cannot be folded into the base weights."
        )


class SparseMoABlock(nn.Module, BaseTunerLayer, RoutingObserver):
    """The decoder-block part of SparseMoA: router, threshold and parallel adapter, per adapter.

    Containers (``nn.ModuleDict`` keyed by adapter, each entry an ``nn.Linear`` with bias):
    ``sparsemoa_router_gate`` and ``sparsemoa_router_up`` ``(d -> H)`` and ``sparsemoa_router_down``
    ``(H -> E)`` (only ``router_down``, ``d -> E``, for a linear router); ``sparsemoa_threshold``
    ``(d -> 1)``; ``sparsemoa_adapter_down`` ``(d -> a)`` and ``sparsemoa_adapter_up`` ``(a -> d)``.

    The block is a child of its decoder block (so it is sharded, moved and saved with it) but its
    ``forward`` is never called: a forward pre-hook on the router input module computes the gates, a
    forward hook on the MLP adds the parallel adapter.

    Args:
        block_key: module name of the decoder block.
        hidden_size: ``d``, the width of the block's hidden states.
        context: the tuner's :class:`~comol.mixture.RoutingContext` (attention mask for statistics).
    """

    prefix = "sparsemoa_"
    adapter_layer_names = tuple(
        "sparsemoa_" + part
        for part in ("router_gate", "router_up", "router_down", "threshold", "adapter_down", "adapter_up")
    )
    other_param_names = ("adapter_config", "num_experts")
    normalized_gates = False  # independent sigmoid gates

    def __init__(self, block_key: str, hidden_size: int, context: RoutingContext | None = None) -> None:
        nn.Module.__init__(self)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self.module_key = block_key
        self.hidden_size = hidden_size
        self.adapter_config: dict[str, SparseMoAConfig] = {}
        self.num_experts: dict[str, int] = {}
        self.gates = BlockGates(block_key)
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.router_input: str | None = None  # name of the child whose input the router reads
        self.mlp: str | None = None  # name of the child the parallel adapter runs beside
        self._handles: list[RemovableHandle] = []
        # A frozen base layer of the block, whose device and dtype the adapter follows (a tuple, so that it is
        # not registered as a submodule).
        self.reference: tuple[nn.Module, ...] = ()
        self.init_observer(context)

    def get_base_layer(self) -> nn.Module:
        """The reference base layer (for peft's device and dtype handling; this module wraps none)."""
        if not self.reference:
            raise RuntimeError(f"{self.module_key}: SparseMoA block without a reference layer.")
        return self.reference[0]

    # --- set-up -------------------------------------------------------------------------------------
    def attach(self, block: nn.Module, router_input: str, mlp: str | None) -> None:
        """Hook the router onto ``block.<router_input>`` and the parallel adapter onto ``block.<mlp>``.

        Done once per block; a later adapter must name the same modules.
        """
        for name, current, hook_mlp in ((router_input, self.router_input, False), (mlp, self.mlp, True)):
            if name is None:
                continue
            if current is not None:
                if current != name:
                    raise ValueError(
                        f"Block {self.module_key!r} already uses {current!r} where this adapter asks for {name!r}; "
                        "every SparseMoA adapter of a model must use the same router_input_module and mlp_module."
                    )
                continue
            child = getattr(block, name, None)
            if not isinstance(child, nn.Module):
                children = ", ".join(n for n, _ in block.named_children() if n != BLOCK_ATTR)
                raise ValueError(
                    f"SparseMoA: decoder block {self.module_key!r} has no child module {name!r} (its children: "
                    f"{children}). Set router_input_module / mlp_module to the right names, or "
                    "parallel_adapter_size=0 to train without the parallel adapter."
                )
            if hook_mlp:
                self._handles.append(child.register_forward_hook(self._adapter_hook, with_kwargs=True))
                self.mlp = name
            else:
                self._handles.append(child.register_forward_pre_hook(self._route_hook, with_kwargs=True))
                self.router_input = name

    def detach(self) -> None:
        """Remove the hooks (on unload)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.gates.gates.clear()

    def update_layer(self, adapter_name: str, config: SparseMoAConfig, num_lora_experts: int) -> None:
        """Create and initialise this adapter's router, threshold and parallel adapter."""
        d, a = self.hidden_size, config.parallel_adapter_size
        num_experts = num_lora_experts + (1 if a else 0)
        self.adapter_config[adapter_name] = config
        self.num_experts[adapter_name] = num_experts
        if config.router_hidden_factor:
            hidden = config.router_hidden_factor * num_experts
            self.sparsemoa_router_gate[adapter_name] = nn.Linear(d, hidden)
            self.sparsemoa_router_up[adapter_name] = nn.Linear(d, hidden)
            self.sparsemoa_router_down[adapter_name] = nn.Linear(hidden, num_experts)
        else:
            self.sparsemoa_router_down[adapter_name] = nn.Linear(d, num_experts)
        if config.sparse:
            self.sparsemoa_threshold[adapter_name] = nn.Linear(d, 1)
        if a:
            self.sparsemoa_adapter_down[adapter_name] = nn.Linear(d, a)
            self.sparsemoa_adapter_up[adapter_name] = nn.Linear(a, d)
        self.reset_adapter(adapter_name, config)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: SparseMoAConfig) -> None:
        for part in ("router_gate", "router_up", "router_down"):
            container = getattr(self, self.prefix + part)
            if adapter_name in container:
                linear = container[adapter_name]
                linear.reset_parameters()
                nn.init.zeros_(linear.bias)
        if adapter_name in self.sparsemoa_threshold:
            self.sparsemoa_threshold[adapter_name].reset_parameters()
        if adapter_name in self.sparsemoa_adapter_down:
            down, up = self.sparsemoa_adapter_down[adapter_name], self.sparsemoa_adapter_up[adapter_name]
            down.reset_parameters()
            nn.init.zeros_(down.bias)
            if config.init_weights:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            else:
                up.reset_parameters()

    # --- the forward pass ---------------------------------------------------------------------------
    def route(self, adapter_name: str, u: torch.Tensor) -> torch.Tensor:
        """Gates ``(..., E)`` float32 of every expert of the block for router input ``u (..., d)``."""
        config = self.adapter_config[adapter_name]
        down = self.sparsemoa_router_down[adapter_name]
        u = u.to(down.weight.dtype)
        if config.router_hidden_factor:
            gate, up = self.sparsemoa_router_gate[adapter_name], self.sparsemoa_router_up[adapter_name]
            logits = down(F.silu(gate(u)) * up(u))  # (..., E)
        else:
            logits = down(u)  # (..., E)
        probs = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))  # (..., E)
        gates = probs
        if config.sparse:
            threshold_logit = self.sparsemoa_threshold[adapter_name](u).to(probs.dtype)  # (..., 1)
            threshold = config.max_threshold * torch.sigmoid(threshold_logit)  # (..., 1)
            # The indicator has no gradient; "+ 0 * threshold" keeps the threshold network in the graph with
            # the zero gradient the formula implies, so that DDP/FSDP see every trainable parameter used.
            gates = probs * (probs >= threshold) + 0.0 * threshold  # (..., E)
        self.observe_routing(adapter_name, probs, gates)
        return gates

    def _route_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.disable_adapters:
            return
        u = _hidden_states(args, kwargs, f"{self.module_key}.{self.router_input}")  # (..., d)
        for name in self.active_adapters:
            if name in self.adapter_config:
                self.gates.gates[name] = self.route(name, u)

    def _adapter_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> torch.Tensor | None:
        if self.disable_adapters:
            return None
        where = f"{self.module_key}.{self.mlp}"
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"SparseMoA's parallel adapter adds to the output of {where}, which returned a "
                f"{type(output).__name__}, not a tensor. Set mlp_module to a module returning the hidden states "
                "or parallel_adapter_size=0."
            )
        v = _hidden_states(args, kwargs, where)  # (..., d)
        for name in self.active_adapters:
            if name not in self.sparsemoa_adapter_down:
                continue
            gate = self.gates.column(name, self.num_experts[name] - 1, v.shape[:-1], where)  # (..., 1)
            down, up = self.sparsemoa_adapter_down[name], self.sparsemoa_adapter_up[name]
            delta = up(F.silu(down(v.to(down.weight.dtype))))  # (..., d)
            output = output + (delta * gate.to(delta.dtype)).to(output.dtype)
        return output

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.gates.gates.pop(adapter_name, None)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, router_input={self.router_input!r}, mlp={self.mlp!r}"


class SparseMoAModel(MixtureModel):
    """peft tuner for SparseMoA (``peft.get_peft_model(model, SparseMoAConfig(...))``).

    Wraps every targeted linear layer in a :class:`SparseMoALayer` (peft's injection) and then gives every
    decoder block holding one a :class:`SparseMoABlock` under ``<block>.moa_block``.
    """

    prefix = "sparsemoa_"
    tuner_layer_cls = SparseMoALayer

    def _check_new_adapter_config(self, config: SparseMoAConfig) -> None:
        """Refuse, before anything is injected, an adapter that would hook other modules than the others."""
        super()._check_new_adapter_config(config)
        for name, other in self.peft_config.items():
            if other is config:
                continue
            same_mlp = not (config.parallel_adapter_size and other.parallel_adapter_size) or (
                other.mlp_module == config.mlp_module
            )
            if other.router_input_module != config.router_input_module or not same_mlp:
                raise ValueError(
                    f"Adapter {name!r} routes on {other.router_input_module or 'auto'!r} with its parallel adapter "
                    f"beside {other.mlp_module!r}; every SparseMoA adapter of a model must use the same "
                    "router_input_module and mlp_module."
                )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            self._attach_blocks(model, adapter_name)

    def _attach_blocks(self, model: nn.Module, adapter_name: str) -> None:
        config: SparseMoAConfig = self.peft_config[adapter_name]
        experts: dict[str, list[tuple[str, SparseMoALayer]]] = {}
        for key, module in model.named_modules():
            if isinstance(module, SparseMoALayer) and adapter_name in module.adapter_config:
                experts.setdefault(block_key(key), []).append((key, module))
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError(
                "SparseMoA needs the width of the decoder blocks' hidden states (model.config.hidden_size), "
                "which this model does not have."
            )
        for bkey, layers in experts.items():
            block = model.get_submodule(bkey)
            router_input = config.router_input_module or layers[0][0][len(bkey) + 1 :].split(".")[0]
            moa = getattr(block, BLOCK_ATTR, None)
            if moa is None:
                moa = SparseMoABlock(bkey, hidden_size, context=self.routing_context)
                moa._active_adapter = list(self.active_adapters)
                block.add_module(BLOCK_ATTR, moa)
            moa.attach(block, router_input, config.mlp_module if config.parallel_adapter_size else None)
            for index, (_, layer) in enumerate(layers):
                layer.gate_index[adapter_name] = index
                layer.block_gates = moa.gates
            moa.update_layer(adapter_name, config, num_lora_experts=len(layers))
            moa.reference = (layers[0][1].get_base_layer(),)
            moa._move_adapter_to_device_of_base_layer(adapter_name)  # peft's: device and dtype, meta skipped
            moa.set_adapter(moa.active_adapters, inference_mode=config.inference_mode)

    def blocks(self) -> list[SparseMoABlock]:
        """The :class:`SparseMoABlock` of every adapted decoder block."""
        return [module for module in self.model.modules() if isinstance(module, SparseMoABlock)]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        for block in self.blocks():
            block.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for block in self.blocks():
            block.delete_adapter(adapter_name)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        blocks = {block.module_key: block for block in self.blocks()}
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        for key, block in blocks.items():
            block.detach()
            delattr(model.get_submodule(key), BLOCK_ATTR)
        return model


register_method("sparsemoa", SparseMoAConfig, SparseMoAModel)
