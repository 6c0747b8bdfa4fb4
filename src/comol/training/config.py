"""Typed configuration of a training run: YAML files plus ``key=value`` overrides.

A run is described by one :class:`TrainConfig` with four sections, each a dataclass whose fields are
documented (the documentation is what ``comol train --help`` prints) and cross-checked in
``__post_init__``::

    model:    which causal LM to load and in which dtype
    data:     where the LLM-Adapters records come from and how they are rendered and tokenised
    adapter:  the method (any name of :func:`comol.methods.method_names`) and its hyperparameters
    train:    optimiser, schedule, batch sizes, logging, evaluation and checkpointing

A YAML file may start from another one with a top-level ``base: other.yaml`` key (path relative to the
file); the file's own keys are merged over the base's, section by section. Overrides such as
``train.learning_rate=1e-4`` or ``adapter.options.num_experts=4`` are applied last. Unknown keys are an
error everywhere except inside ``adapter.options``, which is handed to the method's config class, which
rejects the keys it does not know.

Every validation error is a :class:`comol.errors.UserError` naming the key (``comol train`` exits 2 on it):
numbers must be finite, and out-of-range values are refused here, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from comol import loading
from comol.data.prompts import TEMPLATES
from comol.errors import UserError
from comol.loading import canonical_dtype
from comol.training.typed_yaml import describe_fields, from_dict, parse_override, read_yaml, set_dotted

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TRAINERS: tuple[str, ...] = ("transformers", "trl")
LONG_PROMPT_POLICIES: tuple[str, ...] = ("error", "drop")

# Keys of the config that may change when a run is resumed: how long it runs, where it is written and
# how it is logged, evaluated and checkpointed. Any other change alters the adapter the run produces.
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.max_steps",
    "train.num_epochs",
    "train.output_dir",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.disable_tqdm",
    "train.dataloader_num_workers",
)


@dataclass
class ModelConfig:
    """The base model to fine-tune."""

    name_or_path: str = field(
        default="", metadata={"help": "Hub id or local directory of a causal LM (required)."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "File name of a GGUF checkpoint inside `name_or_path`; it is de-quantised on load."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(
        default="bf16",
        metadata={
            "help": "Precision: bf16 or fp16 (base weights in that dtype, adapters in float32 under autocast) "
            "or fp32 (long forms bfloat16, float16, float32 also accepted)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "transformers attention backend (eager, sdpa, ...); None: its default."},
    )
    quantization: str = field(
        default="none",
        metadata={
            "help": "bitsandbytes quantization of the frozen base weights (QLoRA): nf4 or fp4 (4-bit), int8, "
            "or none. The adapter stays in float32; merging into a quantized base is refused."
        },
    )
    compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype 4-bit layers dequantize to and compute in (bf16, fp16, fp32); null: model.dtype."
        },
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "Also quantize the 4-bit blocks' scales (QLoRA's double quantization)."},
    )

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype, allow_auto=False, what="model.dtype")
        self.quantization = loading.canonical_quantization(self.quantization, what="model.quantization")
        if self.compute_dtype is not None:
            self.compute_dtype = canonical_dtype(
                self.compute_dtype, allow_auto=False, what="model.compute_dtype"
            )
        if self.quantization != "none" and self.gguf_file is not None:
            raise ValueError(
                "model.quantization needs full-precision checkpoint weights to quantize; a GGUF file "
                "(model.gguf_file) is already quantized. Use a safetensors checkpoint, or model.quantization=none."
            )

    def load_model(self) -> PreTrainedModel:
        """The base causal LM in ``dtype``, quantized if asked (:func:`comol.loading.load_causal_lm`)."""
        compute_dtype = loading.resolve_dtype(self.compute_dtype or self.dtype)
        return loading.load_causal_lm(
            self.name_or_path,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
            quantization=loading.bnb_config(self.quantization, compute_dtype, self.double_quant),
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (from the GGUF file if ``gguf_file`` is set)."""
        return loading.load_tokenizer(
            self.name_or_path,
            gguf_file=self.gguf_file,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class DataConfig:
    """Training data in the LLM-Adapters format: records with ``instruction``, ``input``, ``output``."""

    train: str = field(
        default="",
        metadata={"help": "Training records: a local .json/.jsonl file or a `datasets` hub id (required)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to read when `train` is a hub id."})
    validation: str | None = field(
        default=None, metadata={"help": "Validation records (file or hub id); None: hold out `val_size`."}
    )
    validation_split: str = field(
        default="train", metadata={"help": "Split to read when `validation` is a hub id."}
    )
    val_size: float = field(
        default=0.0,
        metadata={
            "help": "Held out from `train` for the evaluation loss when `validation` is None: a fraction if "
            "< 1, a number of records if >= 1, 0 for no validation."
        },
    )
    template: str = field(
        default="alpaca",
        metadata={"help": "Prompt template: alpaca (the paper's LLM-Adapters setup) or chat (tokenizer's)."},
    )
    response_only_loss: bool = field(
        default=True, metadata={"help": "Compute the loss on the response tokens only (prompt masked)."}
    )
    max_length: int = field(
        default=256, metadata={"help": "Truncate prompt + response + EOS to this many tokens."}
    )
    long_prompts: str = field(
        default="error",
        metadata={
            "help": "Records whose prompt alone reaches `max_length`: error, or drop them with a warning."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training records (after the validation split)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation records."}
    )

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise UserError(f"data.template must be one of {TEMPLATES}, got {self.template!r}.")
        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise UserError(
                f"data.long_prompts must be one of {LONG_PROMPT_POLICIES}, got {self.long_prompts!r}."
            )
        if self.max_length < 2:
            raise UserError(f"data.max_length must be at least 2, got {self.max_length}.")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise UserError(
                f"data.val_size must be a fraction in [0, 1) or a whole count, got {self.val_size}."
            )
        if self.validation is not None and self.val_size > 0:
            raise UserError("Give either data.validation or data.val_size, not both.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"data.{name} must be positive or null, got {value}.")


# adapter.trainable: which parameter-name parts train (None: every adapter parameter).
TRAINABLE_PARTS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "router": ("router",),
    "router+cores": ("router", "cores"),
}


@dataclass
class AdapterConfig:
    """The adapter method and its hyperparameters (validated by the method's own config class)."""

    method: str = field(
        default="comol", metadata={"help": "Method name: lora, comol, molora, ... (see `comol params`)."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank r (per expert for mixture methods)."})
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "Scaling numerator alpha (update scaled by alpha / r); None: alpha = r."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module name suffixes to adapt, e.g. [q_proj, v_proj]; None: the architecture's default "
            "(q, k, v, o, down projections for Llama/Qwen-style models, as in the paper)."
        },
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any further option of the method's config, e.g. {num_experts: 8, lora_dropout: 0.05}; "
            "unknown options are rejected by the method."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from this saved adapter directory (e.g. one written by `comol compose`) instead of a "
            "fresh adapter; its own config is used, so leave method, r, lora_alpha, target_modules and options "
            "unset (or equal to the saved ones)."
        },
    )
    trainable: str = field(
        default="all",
        metadata={
            "help": "Which adapter parameters train: all, router (only the routers, e.g. of a composed "
            "adapter) or router+cores (routers and CoMoL's expert cores; A and B stay frozen)."
        },
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"adapter.r must be positive, got {self.r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise UserError(f"adapter.lora_alpha must be positive or null, got {self.lora_alpha}.")
        reserved = {"r", "lora_alpha", "target_modules", "task_type"} & set(self.options)
        if reserved:
            raise UserError(f"Set {sorted(reserved)} directly under adapter:, not in adapter.options.")
        if self.trainable not in TRAINABLE_PARTS:
            raise UserError(
                f"adapter.trainable must be one of {list(TRAINABLE_PARTS)}, got {self.trainable!r}."
            )
        if self.init_from is not None:
            self._check_init_from()

    def _check_init_from(self) -> None:
        path = Path(self.init_from) / "adapter_config.json"
        if not path.is_file():
            raise UserError(
                f"adapter.init_from={self.init_from!r} has no adapter_config.json; give an adapter dir."
            )
        saved = json.loads(path.read_text())
        saved_method = str(saved.get("peft_type", "")).lower()
        clashes = [
            name
            for name, clash in (
                ("method", self.method != "comol" and self.method.lower() != saved_method),
                ("r", self.r != 8 and self.r != saved.get("r")),
                ("lora_alpha", self.lora_alpha is not None and self.lora_alpha != saved.get("lora_alpha")),
                ("target_modules", self.target_modules is not None),
                ("options", bool(self.options)),
            )
            if clash
        ]
        if clashes:
            raise UserError(
                f"adapter.init_from={self.init_from!r} brings its own config; remove adapter.{', adapter.'.join(clashes)} "
                "(or set them to the saved values)."
            )

    @property
    def alpha(self) -> float:
        """The effective ``lora_alpha`` (``r`` when unset)."""
        return float(self.r) if self.lora_alpha is None else self.lora_alpha

    def build(self, target_modules: list[str] | None = None) -> PeftConfig:
        """The method's peft config (raises ``ValueError`` for an unknown method or option).

        Args:
            target_modules: overrides ``self.target_modules`` (e.g. the architecture default).
        """
        from comol.methods import build_config, config_fields

        kwargs: dict[str, Any] = {"r": self.r, "lora_alpha": self.alpha, **self.options}
        modules = target_modules if target_modules is not None else self.target_modules
        if modules is not None:
            kwargs["target_modules"] = list(modules)
        if "task_type" in config_fields(self.method):
            kwargs["task_type"] = "CAUSAL_LM"
        alpha = kwargs["lora_alpha"]
        if isinstance(alpha, float) and alpha.is_integer():
            kwargs["lora_alpha"] = int(alpha)
        return build_config(self.method, **kwargs)


@dataclass
class TrainingConfig:
    """The ``train:`` section: optimisation, schedule, batch sizes, logging, evaluation, checkpointing and the
    run directory (mapped onto ``TrainingArguments``)."""

    output_dir: str = field(
        default="runs/comol", metadata={"help": "Run directory: checkpoints, logs, config, final adapter."}
    )
    num_epochs: float = field(default=1.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimiser steps; -1: use num_epochs."}
    )
    micro_batch_size: int = field(default=4, metadata={"help": "Sequences per device per forward pass."})
    gradient_accumulation_steps: int = field(
        default=4,
        metadata={"help": "Micro-batches per optimiser step (global batch = micro x accum x devices)."},
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(
        default="linear",
        metadata={"help": "transformers scheduler name: linear, cosine, constant_with_warmup, constant, ..."},
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Linear warm-up steps (takes precedence over ratio)."}
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of all steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."}
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "transformers optimiser name (default: transformers' own, torch's fused AdamW)."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of adapter initialisation, data order and dropout."}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, lr, tokens/s and router statistics every N steps."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluation loss every N steps; None: at the end of each epoch."}
    )
    save_steps: int | None = field(
        default=200, metadata={"help": "Checkpoint every N steps; None: at the end of each epoch."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep at most N checkpoints; None: all."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations to save memory."}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Loggers: tensorboard, wandb, ... or []."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})
    trainer: str = field(
        default="transformers", metadata={"help": "transformers (Trainer) or trl (TRL's SFTTrainer)."}
    )
    disable_tqdm: bool = field(
        default=False, metadata={"help": "Hide the progress bar (logs still printed)."}
    )
    max_bad_steps: int = field(
        default=0,
        metadata={
            "help": "Optimiser steps with a non-finite loss or gradient that may be skipped (update dropped, "
            "warning logged, counted as bad_steps in metrics.json) before the run stops as diverged; "
            "0: stop at the first."
        },
    )

    def __post_init__(self) -> None:
        from transformers.trainer_utils import SchedulerType

        schedulers = sorted(s.value for s in SchedulerType)
        if self.lr_scheduler not in schedulers:
            raise UserError(f"train.lr_scheduler must be one of {schedulers}, got {self.lr_scheduler!r}.")
        if self.trainer not in TRAINERS:
            raise UserError(f"train.trainer must be one of {TRAINERS}, got {self.trainer!r}.")
        if self.learning_rate <= 0:
            raise UserError(f"train.learning_rate must be positive, got {self.learning_rate}.")
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise UserError("train.micro_batch_size and train.gradient_accumulation_steps must be >= 1.")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise UserError(f"train.max_steps must be positive or -1, got {self.max_steps}.")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise UserError("Set train.num_epochs > 0 or train.max_steps > 0.")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise UserError("train.warmup_ratio must be in [0, 1) and train.warmup_steps >= 0.")
        for name in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"train.{name} must be positive or null, got {value}.")
        for name in (
            "weight_decay",
            "max_grad_norm",
            "num_epochs",
            "dataloader_num_workers",
            "max_bad_steps",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"train.seed must be in [0, 2**32), got {self.seed}.")
        if not self.output_dir:
            raise UserError("train.output_dir must not be empty.")


@dataclass
class TrainConfig:
    """A complete training run."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "The adapter method."})
    train: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"help": "The optimisation and the run directory."}
    )

    def __post_init__(self) -> None:
        if not self.model.name_or_path:
            raise UserError("model.name_or_path is required (a hub id or a local directory).")
        if not self.data.train:
            raise UserError("data.train is required (a .json/.jsonl file or a datasets hub id).")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable) of every resolved field."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, loadable again with :func:`load_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate_method(self) -> None:
        """Build the adapter's peft config once, so that a bad method or option fails before any loading."""
        if self.adapter.init_from is None:  # a saved adapter's config was checked when it was saved
            self.adapter.build()


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from a YAML file (optional) and ``key=value`` overrides.

    Args:
        path: YAML file; it may name a ``base`` file to start from.
        overrides: strings ``section.key=value`` with YAML values, e.g. ``train.max_steps=10``,
            ``adapter.target_modules=[q_proj,v_proj]``, ``adapter.options.num_experts=4``.

    Returns:
        The resolved, validated config.

    Raises:
        UserError: unknown keys, wrong types, bad values or missing required fields.
    """
    raw: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return from_dict(TrainConfig, raw)


def describe() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` of every field of :class:`TrainConfig` (what ``comol train --help`` lists)."""
    return describe_fields(TrainConfig)
