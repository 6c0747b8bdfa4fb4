"""The decoder-block part of SparseMoA: one router, threshold and parallel adapter per block and adapter.

The block's router reads the input ``u (..., d)`` of its router input module and writes the gates
``(..., E)`` of all of the block's experts into a :class:`BlockGates`, which the LoRA experts
(:class:`~comol.methods.sparsemoa.layer.SparseMoALayer`) and the parallel adapter read (formulas in
:mod:`comol.methods.sparsemoa`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from comol.mixture.adapters import AdapterContainers
from comol.mixture.observe import RoutingContext

if TYPE_CHECKING:
    from comol.methods.sparsemoa.config import SparseMoAConfig

BLOCK_ATTR = "moa_block"
"""Name under which each decoder block holds its :class:`SparseMoABlock`. It must not contain the method prefix
``sparsemoa_``: transformers' ``load_adapter`` inserts the adapter name after the first name that does."""


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


class SparseMoABlock(nn.Module, AdapterContainers):
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
    module_parts = ("router_gate", "router_up", "router_down", "threshold", "adapter_down", "adapter_up")
    other_param_names = ("adapter_config", "num_experts")
    normalized_gates = False  # independent sigmoid gates

    def __init__(self, block_key: str, hidden_size: int, context: RoutingContext | None = None) -> None:
        nn.Module.__init__(self)
        self.init_adapter_containers(block_key, context)
        self.hidden_size = hidden_size
        self.num_experts: dict[str, int] = {}
        self.gates = BlockGates(block_key)
        self.router_input: str | None = None  # name of the child whose input the router reads
        self.mlp: str | None = None  # name of the child the parallel adapter runs beside
        self._handles: list[RemovableHandle] = []
        # A frozen base layer of the block, whose device and dtype the adapter follows (a tuple, so that it is
        # not registered as a submodule).
        self.reference: tuple[nn.Module, ...] = ()

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
            container = self.part(part)
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
        if self.context.adapter_names is not None:  # mixed-adapter batch: each adapter routes its own rows
            for name, rows in self.context.adapter_rows(u.shape[0], u.device):
                if name in self.adapter_config:
                    with self.context.rows(rows):
                        self.gates.gates[name] = self.route(name, u[rows])  # (n, ..., E)
            return
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
        if self.context.adapter_names is not None:  # mixed-adapter batch: each adapter on its own rows
            return self._mixed_batch_adapter(v, output, where)
        for name in self.active_adapters:
            if name not in self.sparsemoa_adapter_down:
                continue
            gate = self.gates.column(name, self.num_experts[name] - 1, v.shape[:-1], where)  # (..., 1)
            down, up = self.sparsemoa_adapter_down[name], self.sparsemoa_adapter_up[name]
            delta = up(F.silu(down(v.to(down.weight.dtype))))  # (..., d)
            output = output + (delta * gate.to(delta.dtype)).to(output.dtype)
        return output

    def _mixed_batch_adapter(self, v: torch.Tensor, output: torch.Tensor, where: str) -> torch.Tensor:
        """The parallel adapters of a mixed-adapter batch: ``v (B, ..., d)``, ``output (B, ..., d)``; each
        adapter adds to its own rows (``context.adapter_names``), gated by the gates its router gave them."""
        for name, rows in self.context.adapter_rows(v.shape[0], v.device):
            if name not in self.sparsemoa_adapter_down:
                continue
            v_rows = v[rows]  # (n, ..., d)
            gate = self.gates.column(
                name, self.num_experts[name] - 1, v_rows.shape[:-1], where
            )  # (n, ..., 1)
            down, up = self.sparsemoa_adapter_down[name], self.sparsemoa_adapter_up[name]
            delta = up(F.silu(down(v_rows.to(down.weight.dtype))))  # (n, ..., d)
            output = output.index_add(0, rows, (delta * gate.to(delta.dtype)).to(output.dtype))
        return output

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.gates.gates.pop(adapter_name, None)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, router_input={self.router_input!r}, mlp={self.mlp!r}"
