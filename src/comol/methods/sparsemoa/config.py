"""Configuration of SparseMoA (see :mod:`comol.methods.sparsemoa`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from comol.mixture import MixtureConfig
from comol.mixture.registration import ComolPeftType


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
