"""SparseMoA's LoRA experts: one per adapted linear layer, gated by its decoder block's router."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from comol.mixture import MixtureLayer

if TYPE_CHECKING:
    from comol.methods.sparsemoa.block import BlockGates
    from comol.methods.sparsemoa.config import SparseMoAConfig


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
