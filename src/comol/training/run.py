"""The training entry point behind ``comol train``: validate, load, fine-tune, save the adapter.

Everything that can be checked without the model (method and options, data fields, config values) is
checked first, so a bad run fails in seconds. The run directory receives:

- ``config.yaml``: the fully resolved config (re-runnable with ``comol train config.yaml``);
- ``run_info.json``: library versions, git commit, command line, world size;
- ``checkpoint-N/``: complete checkpoints (adapter, optimizer, scheduler, RNG, trainer state);
- ``runs/``: TensorBoard logs; ``metrics.json``: final train and evaluation metrics;
- ``adapter/``: the final adapter (``PeftModel.from_pretrained(base, run_dir / "adapter")`` after ``import comol``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from comol.files import atomic_write_text
from comol.training.adapter import attach_adapter
from comol.training.arguments import build_trainer, training_arguments
from comol.training.config import TrainConfig
from comol.training.data import check_max_length, load_records, split_validation, tokenize_records
from comol.training.distributed import check_distributed_type, check_fsdp2_buffers, env_flag
from comol.training.rundir import (
    ADAPTER_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_INFO_FILE,
    check_output_dir,
    check_resume_config,
    clear_run,
    resume_checkpoint,
    resumed_run_info,
    run_info,
    save_adapter,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        output_dir: the run directory.
        adapter_dir: the saved final adapter.
        metrics: final training metrics and, with validation data, ``eval_loss``.
        model: the trained ``PeftModel`` (still in memory, e.g. for evaluation).
        tokenizer: its tokenizer.
        log_history: the Trainer's log entries.
    """

    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, float]
    model: PeftModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class PreparedData:
    """Records read and checked before any model is loaded."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def prepare_data(config: TrainConfig) -> PreparedData:
    """Read the training and validation records and check them (fields, emptiness, split sizes)."""
    data = config.data
    train = load_records(data.train, data.train_split)
    if data.validation is not None:
        validation = load_records(data.validation, data.validation_split)
    else:
        train, validation = split_validation(train, data.val_size, config.train.seed)
    if data.max_train_samples is not None:
        train = train[: data.max_train_samples]
    if data.max_eval_samples is not None:
        validation = validation[: data.max_eval_samples]
    return PreparedData(train=train, validation=validation)


def train(
    config: TrainConfig,
    *,
    resume: bool | str | os.PathLike = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    callbacks: list[TrainerCallback] | None = None,
    records: PreparedData | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` with ``config.adapter`` on ``config.data``.

    Args:
        config: the resolved run config.
        resume: ``True`` continues from the newest checkpoint in ``train.output_dir`` (starting afresh if
            the directory holds no run yet), a path continues from that checkpoint, ``False`` starts afresh
            and refuses a directory that already holds a run (checkpoints, ``adapter/`` or ``metrics.json``).
            The checkpoint must be complete (:func:`comol.training.rundir.check_checkpoint`) and the config
            the same as the run's saved one except for the keys of
            :data:`comol.training.rundir.RESUMABLE_KEYS` (e.g. ``train.max_steps``).
        overwrite: with ``resume=False``, replace the run already in ``train.output_dir`` (its checkpoints,
            adapter, config, logs and metrics are removed once the model is loaded).
        allow_config_change: resume even with other config changes; they are recorded in ``run_info.json``
            (``resumes``) and ``config.yaml`` holds the new values.
        model: an already loaded base model to use instead of loading ``config.model``.
        tokenizer: an already loaded tokenizer to use instead of loading one.
        callbacks: extra ``TrainerCallback`` objects.
        records: already prepared records (skips reading ``config.data``).

    Returns:
        The run's :class:`TrainResult`.

    Raises:
        ValueError: bad config, data, method options or target modules, an output directory that is a file
            or holds a run, an incomplete checkpoint or a changed config on resume: all found before the
            model is loaded (target modules right after).
    """
    from accelerate import PartialState
    from transformers import set_seed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several processes without GPUs (e.g. torchrun on CPU): accelerate needs this to form a gloo group.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    state = PartialState(cpu=env_flag("ACCELERATE_USE_CPU"))
    check_distributed_type(state.distributed_type)
    # 1. Everything checkable without the model.
    config.validate_method()
    output_dir = Path(config.train.output_dir)
    check_output_dir(output_dir)
    checkpoint = resume_checkpoint(output_dir, resume, overwrite=overwrite)
    changes = check_resume_config(config, checkpoint, allow_change=allow_config_change)
    prepared = records if records is not None else prepare_data(config)

    # 2. Tokenizer and data.
    set_seed(config.train.seed)
    if tokenizer is None:
        tokenizer = config.model.load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = config.data
    common = {
        "tokenizer": tokenizer,
        "template": data.template,
        "max_length": data.max_length,
        "response_only_loss": data.response_only_loss,
        "long_prompts": data.long_prompts,
    }
    train_examples = tokenize_records(prepared.train, name="train", **common)
    eval_examples = (
        tokenize_records(prepared.validation, name="validation", **common) if prepared.validation else []
    )
    logger.info("Data: %d training and %d validation examples.", len(train_examples), len(eval_examples))

    # 3. Model and adapter. The TrainingArguments come first: under `accelerate launch` with a DeepSpeed ZeRO-3
    # config they register the DeepSpeed config with transformers, so that from_pretrained loads the model
    # already partitioned (deepspeed.zero.Init, the accelerate config's zero3_init_flag) instead of whole on
    # every process.
    args = training_arguments(config)
    if model is None:
        model = config.model.load_model()
    check_max_length(config.data.max_length, model.config)
    peft_model = attach_adapter(model, config)
    check_fsdp2_buffers(peft_model)
    if config.train.gradient_checkpointing:
        peft_model.enable_input_require_grads()

    # 4. Run directory.
    if state.is_main_process:
        if overwrite:
            clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        info = run_info(state.num_processes)
        if checkpoint is not None:
            info = resumed_run_info(output_dir, info, checkpoint, changes)
        atomic_write_text(output_dir / CONFIG_FILE, config.to_yaml())
        atomic_write_text(output_dir / RUN_INFO_FILE, json.dumps(info, indent=2, default=str))
    state.wait_for_everyone()

    # 5. Train.
    trainer = build_trainer(
        config, peft_model, tokenizer, train_examples, eval_examples, callbacks, args=args
    )
    check_distributed_type(trainer.accelerator.distributed_type)
    if checkpoint is not None:
        logger.info("Resuming from %s.", checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    metrics = dict(result.metrics)
    if eval_examples:
        metrics.update(trainer.evaluate())
    adapter_dir = save_adapter(trainer, output_dir / ADAPTER_DIR)
    if state.is_main_process:
        atomic_write_text(output_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    logger.info("Adapter saved to %s.", adapter_dir)
    return TrainResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        metrics=metrics,
        model=trainer.model,
        tokenizer=tokenizer,
        log_history=list(trainer.state.log_history),
    )
