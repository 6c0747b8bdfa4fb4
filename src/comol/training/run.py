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
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from comol.training.config import TrainConfig
from comol.training.data import (
    CausalLMCollator,
    load_records,
    split_validation,
    tokenize_records,
)
from comol.training.trainer import ComolTrainer, last_checkpoint, sft_trainer_class

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
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
    model: Any = None,
    tokenizer: Any = None,
    callbacks: list[Any] | None = None,
    records: PreparedData | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` with ``config.adapter`` on ``config.data``.

    Args:
        config: the resolved run config.
        resume: ``True`` continues from the newest complete checkpoint in ``train.output_dir`` (starting
            afresh if there is none), a path continues from that checkpoint, ``False`` starts afresh and
            refuses a run directory that already has checkpoints.
        model: an already loaded base model to use instead of loading ``config.model``.
        tokenizer: an already loaded tokenizer to use instead of loading one.
        callbacks: extra ``TrainerCallback`` objects.
        records: already prepared records (skips reading ``config.data``).

    Returns:
        The run's :class:`TrainResult`.

    Raises:
        ValueError: bad config, data, method options or target modules, found before training starts.
    """
    from accelerate import PartialState
    from transformers import set_seed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several processes without GPUs (e.g. torchrun on CPU): accelerate needs this to form a gloo group.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    state = PartialState(cpu=_env_flag("ACCELERATE_USE_CPU"))
    check_distributed_type(state.distributed_type)
    # 1. Everything checkable without the model.
    config.validate_method()
    output_dir = Path(config.train.output_dir)
    checkpoint = _resume_checkpoint(output_dir, resume)
    prepared = records if records is not None else prepare_data(config)

    # 2. Tokenizer and data.
    set_seed(config.train.seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(config)
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
        model = load_model(config)
    peft_model = attach_adapter(model, config)
    check_fsdp2_buffers(peft_model)
    if config.train.gradient_checkpointing:
        peft_model.enable_input_require_grads()

    # 4. Run directory.
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(output_dir / "config.yaml", config.to_yaml())
        _write_atomic(output_dir / "run_info.json", json.dumps(run_info(state.num_processes), indent=2))
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
        _write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    logger.info("Adapter saved to %s.", adapter_dir)
    return TrainResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        metrics=metrics,
        model=trainer.model,
        tokenizer=tokenizer,
        log_history=list(trainer.state.log_history),
    )


def load_tokenizer(config: TrainConfig) -> Any:
    """The tokenizer of ``config.model`` (from a hub id, a directory or a GGUF file)."""
    from transformers import AutoTokenizer

    m = config.model
    return AutoTokenizer.from_pretrained(
        m.name_or_path, gguf_file=m.gguf_file, revision=m.revision, trust_remote_code=m.trust_remote_code
    )


def load_model(config: TrainConfig) -> Any:
    """The base causal LM of ``config.model`` in the configured dtype."""
    from transformers import AutoModelForCausalLM

    m = config.model
    kwargs: dict[str, Any] = {
        "dtype": _TORCH_DTYPES[m.dtype],
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
    }
    if m.gguf_file is not None:
        kwargs["gguf_file"] = m.gguf_file
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    return AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)


def resolve_target_modules(model: torch.nn.Module, config: TrainConfig) -> list[str] | None:
    """The target modules to use, checked against the model's module names.

    ``None`` in the config means the architecture's default (the paper's q, k, v, o, down projections for
    Llama/Qwen-style models). Every listed name must match at least one module (peft's suffix rule).

    Raises:
        ValueError: a target module matches nothing in the model.
    """
    targets = config.adapter.target_modules
    if targets is None:
        from comol.mixture import DEFAULT_TARGET_MODULES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"No default target modules for model type {model_type!r}; set adapter.target_modules."
            )
        targets = DEFAULT_TARGET_MODULES[model_type]
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
        )
        raise ValueError(
            f"Target module(s) {missing} not found in {type(model).__name__}. Its linear layers are named: "
            f"{', '.join(leaves)}."
        )
    return list(targets)


def attach_adapter(model: torch.nn.Module, config: TrainConfig) -> Any:
    """Wrap ``model`` with the configured adapter (``peft.get_peft_model``) and log its size."""
    import peft

    import comol  # noqa: F401  (registers comol's methods with peft)

    _drop_gguf_quantizer(model)
    peft_config = config.adapter.build(target_modules=resolve_target_modules(model, config))
    peft_model = peft.get_peft_model(model, peft_config)
    trainable = sum(_numel(p) for p in peft_model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in peft_model.parameters())
    logger.info(
        "Method %s: %s trainable parameters (%.3f%% of %s).",
        config.adapter.method,
        f"{trainable:,}",
        100 * trainable / total,
        f"{total:,}",
    )
    return peft_model


def _numel(param: torch.Tensor) -> int:
    # A parameter partitioned by DeepSpeed ZeRO-3 (loaded under zero.Init) is an empty placeholder; ds_numel is
    # its full size.
    return int(getattr(param, "ds_numel", param.numel()))


def check_distributed_type(distributed_type: Any) -> None:
    """Fail if ``accelerate launch`` was asked for FSDP or DeepSpeed but accelerate set up something else.

    ``accelerate launch`` with an FSDP or DeepSpeed config sets ``ACCELERATE_USE_FSDP`` /
    ``ACCELERATE_USE_DEEPSPEED``; accelerate only honours them on accelerator devices. On a machine without
    CUDA it quietly falls back to plain data parallelism (``MULTI_CPU``) or to a single process (``NO``), so
    the run would train unsharded while the user believes it is sharded. Called with the ``PartialState``'s
    type before anything is loaded (which never says ``FSDP``: only a process group on devices fits) and with
    the ``Accelerator``'s once the Trainer exists (which must then say ``FSDP`` or ``DEEPSPEED``).

    Args:
        distributed_type: an ``accelerate.utils.DistributedType``.

    Raises:
        ValueError: the requested strategy is not what accelerate set up.
    """
    from accelerate.utils import DistributedType

    requested = [
        (name, kind)
        for name, kind in (("DeepSpeed", DistributedType.DEEPSPEED), ("FSDP", DistributedType.FSDP))
        if _env_flag(f"ACCELERATE_USE_{name.upper()}")
    ]
    if not requested:
        return
    name, kind = requested[0]
    if distributed_type == kind:
        return
    # Before the Accelerator exists, FSDP shows as a multi-device process group (MULTI_GPU, MULTI_XPU, ...).
    if kind == DistributedType.FSDP and distributed_type not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
    ):
        return
    raise ValueError(
        f"The accelerate config asks for {name} (ACCELERATE_USE_{name.upper()}=true), but accelerate set up "
        f"{getattr(distributed_type, 'value', distributed_type)} instead, so the model would not be sharded. "
        "FSDP and DeepSpeed need CUDA devices (one process per GPU, launched with accelerate launch); "
        f"this machine has {torch.cuda.device_count()} visible CUDA device(s). On CPU use "
        "configs/accelerate/ddp.yaml (plain data parallelism over gloo) or torchrun instead."
    )


def check_fsdp2_buffers(peft_model: torch.nn.Module) -> None:
    """Fail before training if FSDP2's RAM-efficient loading would meet adapter buffers.

    With ``fsdp_cpu_ram_efficient_loading`` accelerate loads the full state dict on rank 0 and distributes it
    as sharded DTensors, which works for parameters only: an adapter's persistent buffers (FlyLoRA's frozen
    ``A`` and balancing bias) end in ``AttributeError: 'Tensor' object has no attribute 'device_mesh'`` after
    the model has been loaded everywhere. Raises a ValueError naming the launch flag that avoids it.
    """
    if not (
        _env_flag("ACCELERATE_USE_FSDP")
        and os.environ.get("FSDP_VERSION") == "2"
        and _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
    ):
        return
    prefix = getattr(getattr(peft_model, "base_model", None), "prefix", None)
    buffers = [name for name, _ in peft_model.named_buffers() if prefix and prefix in name]
    if buffers:
        raise ValueError(
            f"This adapter keeps tensors as buffers ({buffers[0]}, ...), which accelerate's FSDP2 loading with "
            "fsdp_cpu_ram_efficient_loading cannot distribute. Launch with `accelerate launch --config_file "
            "configs/accelerate/fsdp.yaml --fsdp_cpu_ram_efficient_loading false ...`."
        )


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    # transformers de-quantises GGUF weights into ordinary tensors on load but still marks the model as
    # quantized, which makes the Trainer refuse it; the weights are plain, so drop the marker.
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model, "config"):
            model.config.__dict__.pop("quantization_config", None)


def training_arguments(config: TrainConfig) -> Any:
    """The ``TrainingArguments`` equivalent of ``config.train`` (and the dtype of ``config.model``)."""
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
        "use_cpu": _env_flag("ACCELERATE_USE_CPU"),
    }
    if t.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return _rename_deprecated(_known_kwargs(kwargs))


def _rename_deprecated(kwargs: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 renames gradient_checkpointing* to activation_checkpointing*; use the new names if present.
    import dataclasses

    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        new = old.replace("gradient_", "activation_")
        if old in kwargs and new in known:
            kwargs[new] = kwargs.pop(old)
    return kwargs


def _known_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Keep only what this transformers version's TrainingArguments accepts (e.g. logging_dir, save_safetensors).
    import dataclasses

    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    dropped = sorted(set(kwargs) - known)
    if dropped:
        logger.debug("TrainingArguments does not take %s here; skipped.", dropped)
    return {k: v for k, v in kwargs.items() if k in known}


def build_trainer(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    train_examples: list[dict[str, list[int]]],
    eval_examples: list[dict[str, list[int]]],
    callbacks: list[Any] | None = None,
    args: Any = None,
) -> Any:
    """A :class:`ComolTrainer` (or TRL-based equivalent) ready to ``train()``.

    ``args`` are the run's ``TrainingArguments`` (default: :func:`training_arguments` of ``config``).
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
    )


def save_adapter(trainer: Any, target: Path) -> Path:
    """Save the trained adapter into ``target`` atomically (temporary directory, then rename)."""
    tmp = target.parent / f".{target.name}.tmp"
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    trainer.accelerator.wait_for_everyone()
    return target


def run_info(world_size: int = 1) -> dict[str, Any]:
    """Versions, git commit and command line of this run, for ``run_info.json``."""
    import importlib.metadata as md

    versions = {}
    for package in ("comol", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "deepspeed"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": {"python": platform.python_version(), **versions},
        "git_commit": git_commit(),
        "argv": sys.argv,
        "world_size": world_size,
        "cuda": torch.version.cuda,
        "devices": torch.cuda.device_count(),
        "host": platform.node(),
    }


def git_commit() -> str | None:
    """The commit of the comol source checkout (``-dirty`` if modified), or None outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _resume_checkpoint(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    if resume is False:
        existing = last_checkpoint(output_dir)
        if existing is not None:
            raise ValueError(
                f"{output_dir} already holds checkpoints ({existing.name}); pass --resume to continue that run "
                f"or choose another train.output_dir."
            )
        return None
    if resume is True:
        found = last_checkpoint(output_dir)
        if found is None:
            logger.warning("No complete checkpoint in %s; starting afresh.", output_dir)
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no trainer_state.json).")
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
