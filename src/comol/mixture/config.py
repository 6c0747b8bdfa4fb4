"""The config fields every mixture-of-LoRA method shares, in peft's conventions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from comol.mixture.loading import write_card_note

# Default target modules per transformers ``model_type``: the paper's setup (q, k, v, o and down
# projections; gate and up excluded) for Llama/Qwen/Mistral-style models, and the attention and MLP output
# projections of GPT-2-style models.
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
        t: _LLAMA_STYLE
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc2"],
}


@dataclass
class MixtureConfig(PeftConfig):
    """Fields shared by all of comol's mixture-of-LoRA methods.

    Names follow peft's ``LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...), so
    a LoRA recipe carries over. A method's own config subclasses this and adds its fields.
    """

    r: int = field(
        default=8, metadata={"help": "LoRA rank r of the shared (or per-expert) A and B matrices."}
    )
    lora_alpha: float = field(
        default=8, metadata={"help": "Scaling numerator: the update is scaled by alpha / r."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex (full match) to adapt. None: the default for the "
            "model's architecture (q, k, v, o, down projections for Llama/Qwen/Mistral-style models)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (None: all layers)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer container used with layers_to_transform, e.g. 'layers'."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved with the adapter (e.g. a score head)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "Initialise B to zero so the adapted model starts as the base model. False: random B."
        },
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Set automatically for transformers' Conv1D (GPT-2) layers."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform.")

    @property
    def scaling(self) -> float:
        """The factor the adapter update is multiplied by: ``alpha / r`` (or ``alpha / sqrt(r)``)."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's ``adapter_config.json``, and a note in the adapter's ``README.md`` that it needs comol."""
        super().save_pretrained(save_directory, **kwargs)
        write_card_note(save_directory, str(self.peft_type))


@dataclass
class RoutedMixtureConfig(MixtureConfig):
    """A mixture with ``num_experts`` experts chosen per token by a learned router."""

    num_experts: int = field(default=8, metadata={"help": "Number of experts E."})
    router_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the k largest gates per token and renormalise (None: soft over all experts)."
        },
    )
    aux_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the Switch-style load-balancing loss E * sum_e f_e P_e added to the training "
            "loss through comol.mixture.collect_aux_loss (0: off)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.num_experts, int)
            or isinstance(self.num_experts, bool)
            or self.num_experts < 1
        ):
            raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}.")
        if self.router_top_k is not None and not 1 <= self.router_top_k <= self.num_experts:
            raise ValueError(
                f"router_top_k must be between 1 and num_experts={self.num_experts}, got {self.router_top_k!r} "
                "(or None for soft routing over all experts)."
            )
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}.")
