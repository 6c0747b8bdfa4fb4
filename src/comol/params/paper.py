"""The "Param" columns of the CoMoL paper's Tables 2-5, kept as facts, with the settings that reproduce them.

Each :class:`PaperRow` is a figure printed in the paper (arXiv 2603.00573) and the comol method and options
that give it; rows whose figure no setting consistent with the paper reaches record our exact count and why.
:func:`comol.params.paper_table` counts them, ``comol params --paper-table`` renders them and
``tests/test_params.py`` checks every row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaperRow:
    """One trainable-parameter figure of the CoMoL paper and the settings that reproduce it.

    Attributes:
        table: where the figure is printed, e.g. ``"Table 2"``.
        model: preset name.
        label: the row's label in the paper.
        paper_m: the paper's figure in millions.
        method: comol method name.
        options: config fields (``lora_alpha`` = ``r`` and the paper's targets are added).
        note: why these settings (where they differ from what the paper's text states).
        reachable: False when no setting consistent with the paper gives its figure; the test then pins
            our value to ``expected`` instead.
        expected: our exact count, for unreachable rows.
    """

    table: str
    model: str
    label: str
    paper_m: float
    method: str
    options: dict[str, Any]
    note: str = ""
    reachable: bool = True
    expected: int | None = None

    def settings(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


_MOE8 = {"r": 8, "num_experts": 8}
_MOE4 = {"r": 8, "num_experts": 4}
_14B_E8 = "Text says 4 experts for Qwen3-14B; only 8 reproduce the figure."
_FLY = (
    "FlyLoRA's A is frozen, so only B (d_out x r) trains: r=32 gives this. The paper prints LoRA r=16's "
    "figure; counting A too (the reference code keeps it in an nn.Linear left trainable, though applied "
    "under no_grad) would give LoRA r=32's, twice the printed one."
)
_MOA = (
    "MoA's setting: a LoRA expert (r=8) on each of q/k/v/o/down + per decoder block a parallel adapter "
    "d->16->d, a SwiGLU router d->24->6 and a d->1 threshold, all with biases."
)
_DENSE = (
    "One encoder/decoder per target module type shared by all layers + one r x r matrix per module. The "
    "paper's figure is exactly r*(d+d_ff) larger, likely an unused up-projection pair of the reference code "
    "(which creates q/k/v/up/down pairs whatever the targets and trains every lora_ parameter) counted: "
    "22,806,528 + 256*(4096+12288) = 27,000,832 (Qwen3-8B), 22,020,096 + 256*(4096+14336) = 26,738,688 "
    "(Llama-3.1-8B)."
)


def _table5(model: str, figures: Iterable[tuple[int, float, float]]) -> list[PaperRow]:
    rows = []
    for experts, without_cr, with_cr in figures:
        rows.append(
            PaperRow(
                "Table 5",
                model,
                f"CoMoL w/o CR, E={experts}",
                without_cr,
                "comol",
                {"r": 16, "num_experts": experts, "core_router": False},
            )
        )
        rows.append(
            PaperRow(
                "Table 5", model, f"CoMoL, E={experts}", with_cr, "comol", {"r": 16, "num_experts": experts}
            )
        )
    return rows


PAPER_ROWS: list[PaperRow] = [
    # Table 2: Qwen3-8B, math. "rank 8 for all MoE-LoRA methods, 8 experts; LoRA 16, DenseLoRA 256, FlyLoRA 32".
    PaperRow("Table 2", "qwen3-8b", "LoRA", 24.77, "lora", {"r": 16}),
    PaperRow("Table 2", "qwen3-8b", "MoLoRA", 107.35, "molora", _MOE8),
    PaperRow("Table 2", "qwen3-8b", "HydraLoRA", 49.55, "hydralora", _MOE8),
    PaperRow("Table 2", "qwen3-8b", "MoLA", 107.35, "mola", _MOE8),
    PaperRow("Table 2", "qwen3-8b", "AdaMoLE", 108.38, "adamole", _MOE8),
    PaperRow("Table 2", "qwen3-8b", "SparseMoA", 24.49, "sparsemoa", {"r": 8}, _MOA),
    PaperRow("Table 2", "qwen3-8b", "FlyLoRA", 24.77, "flylora", {"r": 32}, _FLY, False, 16_515_072),
    PaperRow(
        "Table 2",
        "qwen3-8b",
        "CoMoL w/o CR",
        33.39,
        "comol",
        {"r": 16, "num_experts": 8, "core_router": False},
        "r=16, not the 8 the text states (as for CoMoL).",
    ),
    PaperRow(
        "Table 2",
        "qwen3-8b",
        "CoMoL",
        25.16,
        "comol",
        {"r": 16, "num_experts": 8},
        "r=16, not the 8 the text states: r=8 gives 12.78M.",
    ),
    # Table 3: Qwen3-14B, math. "4 experts except MoLA".
    PaperRow("Table 3", "qwen3-14b", "LoRA", 35.39, "lora", {"r": 16}),
    PaperRow("Table 3", "qwen3-14b", "MoLoRA", 76.84, "molora", _MOE4),
    PaperRow("Table 3", "qwen3-14b", "HydraLoRA", 40.47, "hydralora", _MOE4),
    PaperRow("Table 3", "qwen3-14b", "MoLA", 153.68, "mola", _MOE8),
    PaperRow("Table 3", "qwen3-14b", "AdaMoLE", 78.36, "adamole", _MOE4),
    PaperRow("Table 3", "qwen3-14b", "SparseMoA", 34.50, "sparsemoa", {"r": 8}, _MOA),
    PaperRow("Table 3", "qwen3-14b", "FlyLoRA", 35.39, "flylora", {"r": 32}, _FLY, False, 22_282_240),
    PaperRow(
        "Table 3",
        "qwen3-14b",
        "CoMoL w/o CR",
        47.90,
        "comol",
        {"r": 16, "num_experts": 8, "core_router": False},
        "Closest: E=8 gives 47.92M (E=4: 41.66M); 47.90M is not reached by any E. " + _14B_E8,
        False,
        47_923_200,
    ),
    PaperRow("Table 3", "qwen3-14b", "CoMoL", 35.82, "comol", {"r": 16, "num_experts": 8}, _14B_E8),
    # Table 4: code generation, Llama-3.1-8B and Qwen3-8B.
    PaperRow("Table 4", "llama-3.1-8b", "LoRA", 23.06, "lora", {"r": 16}),
    PaperRow("Table 4", "llama-3.1-8b", "MoLoRA", 100.14, "molora", _MOE8),
    PaperRow("Table 4", "llama-3.1-8b", "HydraLoRA", 45.09, "hydralora", _MOE8),
    PaperRow("Table 4", "llama-3.1-8b", "MoLA", 100.14, "mola", _MOE8),
    PaperRow("Table 4", "llama-3.1-8b", "AdaMoLE", 101.12, "adamole", _MOE8),
    PaperRow(
        "Table 4", "llama-3.1-8b", "DenseLoRA", 26.74, "denselora", {"r": 256}, _DENSE, False, 22_020_096
    ),
    PaperRow("Table 4", "llama-3.1-8b", "FlyLoRA", 23.06, "flylora", {"r": 32}, _FLY, False, 14_680_064),
    PaperRow(
        "Table 4",
        "llama-3.1-8b",
        "CoMoL w/o CR",
        27.16,
        "comol",
        {"r": 16, "num_experts": 4, "core_router": False},
        "E=4 (E=8 gives 31.26M).",
    ),
    PaperRow(
        "Table 4",
        "llama-3.1-8b",
        "CoMoL",
        23.24,
        "comol",
        {"r": 16, "num_experts": 4},
        "E=4 (E=8 gives 23.42M).",
    ),
    PaperRow("Table 4", "qwen3-8b", "LoRA", 24.77, "lora", {"r": 16}),
    PaperRow("Table 4", "qwen3-8b", "MoLoRA", 107.35, "molora", _MOE8),
    PaperRow("Table 4", "qwen3-8b", "HydraLoRA", 49.55, "hydralora", _MOE8),
    PaperRow("Table 4", "qwen3-8b", "MoLA", 107.35, "mola", _MOE8),
    PaperRow("Table 4", "qwen3-8b", "AdaMoLE", 108.38, "adamole", _MOE8),
    PaperRow("Table 4", "qwen3-8b", "DenseLoRA", 27.00, "denselora", {"r": 256}, _DENSE, False, 22_806_528),
    PaperRow("Table 4", "qwen3-8b", "FlyLoRA", 24.77, "flylora", {"r": 32}, _FLY, False, 16_515_072),
    PaperRow(
        "Table 4",
        "qwen3-8b",
        "CoMoL w/o CR",
        33.40,
        "comol",
        {"r": 16, "num_experts": 8, "core_router": False},
    ),
    PaperRow(
        "Table 4",
        "qwen3-8b",
        "CoMoL",
        24.97,
        "comol",
        {"r": 16, "num_experts": 4},
        "E=4, although CoMoL w/o CR in the same column needs E=8 (E=8 gives 25.16M).",
    ),
    # Table 5: scaling the number of experts (r = 16).
    *_table5("qwen3-8b", [(8, 33.39, 25.16), (16, 42.02, 25.56), (32, 59.28, 26.34), (64, 93.78, 27.91)]),
    *_table5("qwen3-14b", [(16, 60.46, 36.26), (32, 85.52, 37.13), (64, 135.66, 38.87)]),
    PaperRow(
        "Table 5",
        "qwen3-14b",
        "CoMoL w/o CR, E=8",
        47.90,
        "comol",
        {"r": 16, "num_experts": 8, "core_router": False},
        "Not reached by any E; E=8 gives 47.92M.",
        False,
        47_923_200,
    ),
    PaperRow("Table 5", "qwen3-14b", "CoMoL, E=8", 35.82, "comol", {"r": 16, "num_experts": 8}),
]
"""Every "Param" figure of the paper's Tables 2-5 with the settings that reproduce it (``lora_alpha = r``,
targets q, k, v, o, down)."""

TOLERANCE_M = 0.01
"""How far (in millions) a reproduced figure may be from the paper's, which rounds or truncates."""
