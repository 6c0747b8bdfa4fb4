"""The ``train:`` section translated into ``TrainingArguments`` (or TRL's ``SFTConfig``) and a Trainer."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from comol.training.config import TrainConfig
from comol.training.data import CausalLMCollator
from comol.training.distributed import env_flag
from comol.training.trainer import ComolTrainer, sft_trainer_class

if TYPE_CHECKING:
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

logger = logging.getLogger(__name__)


def training_arguments(config: TrainConfig) -> TrainingArguments:
    """The ``TrainingArguments`` equivalent of ``config.train`` (and the dtype of ``config.model``).

    With ``train.trainer: trl`` this is TRL's ``SFTConfig`` (a ``TrainingArguments`` subclass).
    """
    from transformers import TrainingArguments

    t = config.train
    if t.logging_steps and "tensorboard" in t.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(t.output_dir, "runs"))
    kwargs = _training_kwargs(config)
    if t.trainer == "trl":
        from trl import SFTConfig

        # Data arrives tokenised with its own labels: TRL must neither re-tokenise nor pack it.
        return SFTConfig(
            **kwargs, max_length=None, packing=False, dataset_kwargs={"skip_prepare_dataset": True}
        )
    return TrainingArguments(**kwargs)


def _training_kwargs(config: TrainConfig) -> dict[str, Any]:
    t = config.train
    has_eval = config.data.validation is not None or config.data.val_size > 0
    eval_strategy = "no" if not has_eval else ("steps" if t.eval_steps else "epoch")
    kwargs: dict[str, Any] = {
        "output_dir": t.output_dir,
        "num_train_epochs": t.num_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "eval_strategy": eval_strategy,
        "eval_steps": t.eval_steps,
        "save_strategy": "steps" if t.save_steps else "epoch",
        "save_steps": t.save_steps or 500,
        "save_total_limit": t.save_total_limit,
        "gradient_checkpointing": t.gradient_checkpointing,
        "report_to": list(t.report_to) or "none",
        "logging_dir": os.path.join(t.output_dir, "runs"),
        "dataloader_num_workers": t.dataloader_num_workers,
        "remove_unused_columns": False,
        "disable_tqdm": t.disable_tqdm,
        "bf16": config.model.dtype == "bf16",
        "fp16": config.model.dtype == "fp16",
        "save_safetensors": True,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": env_flag("ACCELERATE_USE_CPU"),
    }
    if t.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return _rename_deprecated(_known_kwargs(kwargs))


def _argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def _rename_deprecated(kwargs: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 renames gradient_checkpointing* to activation_checkpointing*; use the new names if present.
    known = _argument_names()
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        new = old.replace("gradient_", "activation_")
        if old in kwargs and new in known:
            kwargs[new] = kwargs.pop(old)
    return kwargs


def _known_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Keep only what this transformers version's TrainingArguments accepts (e.g. logging_dir, save_safetensors).
    known = _argument_names()
    dropped = sorted(set(kwargs) - known)
    if dropped:
        logger.debug("TrainingArguments does not take %s here; skipped.", dropped)
    return {k: v for k, v in kwargs.items() if k in known}


def build_trainer(
    config: TrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[dict[str, list[int]]],
    eval_examples: list[dict[str, list[int]]],
    callbacks: list[TrainerCallback] | None = None,
    args: TrainingArguments | None = None,
) -> Trainer:
    """A :class:`~comol.training.trainer.ComolTrainer` (or its TRL ``SFTTrainer`` twin) ready to ``train()``.

    Args:
        config: the run config (``train.trainer`` picks the Trainer class).
        model: the model to train (a ``PeftModel``).
        tokenizer: its tokenizer (its pad token pads the batches).
        train_examples: tokenised training examples (``input_ids``, ``attention_mask``, ``labels``).
        eval_examples: tokenised validation examples (may be empty).
        callbacks: extra ``TrainerCallback`` objects.
        args: the run's ``TrainingArguments`` (default: :func:`training_arguments` of ``config``).
    """
    import datasets

    if args is None:
        args = training_arguments(config)
    train_dataset = datasets.Dataset.from_list(train_examples)
    eval_dataset = datasets.Dataset.from_list(eval_examples) if eval_examples else None
    collator = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)
    cls = sft_trainer_class() if config.train.trainer == "trl" else ComolTrainer
    return cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        max_bad_steps=config.train.max_bad_steps,
    )
