"""``transformers.Trainer`` (and TRL ``SFTTrainer``) with what mixture-of-LoRA training needs.

:class:`ComolTrainerMixin` adds, on top of any ``Trainer`` subclass:

- the methods' auxiliary losses (:func:`comol.mixture.collect_aux_loss`) to the training loss;
- ``aux_loss``, ``tokens_per_second`` and router statistics (mean gate entropy, largest and smallest
  expert load over layers) in every training log, hence on the console and in TensorBoard, plus per-layer
  entropy and load extremes in TensorBoard;
- atomic checkpoints: a checkpoint is written into a staging directory and renamed into place once
  complete, so ``checkpoint-N`` directories are always whole and ``--resume`` never picks a partial one;
- divergence checks: an optimiser step whose loss (any micro-batch, any process) or gradient norm is not
  finite stops training with :class:`TrainingDivergedError` before the update is applied, or, while fewer
  than ``max_bad_steps`` steps were bad, is skipped with a warning and counted (``bad_steps`` in the
  metrics); and no adapter or checkpoint with a non-finite trainable tensor is ever saved.

Cost of the divergence check: the losses' finiteness is accumulated on the device; one scalar is read on
the host per optimiser step (plus one all-reduce of it with several processes), next to the gradient norm
transformers computes anyway.

:class:`ComolTrainer` is the mixin on ``transformers.Trainer``; :func:`sft_trainer_class` builds the same on
TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comol.errors import UserError
from comol.mixture import RouterStats, collect_aux_loss, register_step_hooks

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Written last into a checkpoint by the Trainer; its presence marks a complete checkpoint.
COMPLETE_MARKER = "trainer_state.json"


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite was saved.

    ``comol train`` exits with :data:`DIVERGED_EXIT_CODE` on it.
    """


DIVERGED_EXIT_CODE = 3
"""Exit status of ``comol train`` for a diverged run (2 is bad input, 1 an unexpected error)."""


def _router_stats(model: torch.nn.Module) -> RouterStats | None:
    try:
        return RouterStats(model, enabled=True)
    except ValueError:  # no mixture layer: plain LoRA
        return None


class ComolTrainerMixin:
    """Adds auxiliary losses, router statistics, tokens/s and atomic checkpoints to a ``Trainer``.

    Put it first in the bases: ``class MyTrainer(ComolTrainerMixin, Trainer)``.

    Args:
        max_bad_steps: how many optimiser steps with a non-finite loss or gradient norm may be skipped (each
            with a warning) before training stops with :class:`TrainingDivergedError`; 0: stop at the first.
        *args: the parent Trainer's positional arguments.
        **kwargs: the parent Trainer's keyword arguments.
    """

    def __init__(self, *args: Any, max_bad_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(
            super(), "_get_grad_norm"
        ):  # where the divergence check hooks in; never skip it silently
            raise RuntimeError(
                "This transformers version's Trainer has no _get_grad_norm; comol's divergence check needs it "
                "(install the transformers version comol is tested with)."
            )
        if max_bad_steps < 0:
            raise UserError(f"train.max_bad_steps must be >= 0, got {max_bad_steps}.")
        if max_bad_steps and (self.is_deepspeed_enabled or self.accelerator.scaler is not None):
            raise UserError(
                "train.max_bad_steps > 0 (skipping bad steps) is not supported under DeepSpeed or fp16 loss "
                "scaling; set train.max_bad_steps=0 (stop at the first non-finite step)."
            )
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self._loss_not_finite: torch.Tensor | None = None  # any micro-batch of this step; on the device
        self._router_stats = _router_stats(self.model)
        self._aux_sum: torch.Tensor | float = 0.0  # summed on the device; read when logging
        self._aux_count = 0
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The parent's optimizer, with the adapters' non-gradient updates (e.g. FlyLoRA's balancing bias)
        run after every step (:func:`comol.mixture.register_step_hooks`)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if getattr(self, "_step_hooks", None) is None:
            self._step_hooks = register_step_hooks(optimizer, self.model)
        return optimizer

    # ---- loss ------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The parent's loss plus, in training, the adapter layers' auxiliary losses."""
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        aux = collect_aux_loss(model)  # always collected, so that evaluation never leaks into training
        if aux is not None and model.training:
            self._aux_sum = self._aux_sum + aux.detach()
            self._aux_count += 1
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                # The LM loss is already a share of the accumulated batch; make aux a share of it too.
                aux = aux / self.current_gradient_accumulation_steps
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        # Mirrors Trainer.training_step: then the Trainer does not divide the loss by the accumulation steps.
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        self._tokens_since_log += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        loss = super().training_step(model, inputs, *args, **kwargs)
        not_finite = ~torch.isfinite(loss.detach())  # stays on the device: no sync per micro-batch
        self._loss_not_finite = (
            not_finite if self._loss_not_finite is None else self._loss_not_finite | not_finite
        )
        return loss

    # ---- divergence ------------------------------------------------------------------------------------
    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """The parent's gradient norm (computed once per optimiser step, before the step), checked with the
        step's losses: a non-finite step stops training or, within ``max_bad_steps``, loses its update."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._step_is_bad(grad_norm):
            self._handle_bad_step(grad_norm)
        return grad_norm

    def _step_is_bad(self, grad_norm: Any) -> bool:
        device = self.args.device
        bad = torch.zeros((), dtype=torch.bool, device=device)
        if self._loss_not_finite is not None:
            bad = bad | self._loss_not_finite.to(device).reshape(())
        self._loss_not_finite = None
        # Under fp16 loss scaling an overflowing gradient is routine: the GradScaler skips that step itself.
        if grad_norm is not None and self.accelerator.scaler is None:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=device)).reshape(())
        if self.args.world_size > 1:  # the losses are per process; decide together
            bad = self.accelerator.reduce(bad.to(torch.int32), reduction="sum") > 0
        return bool(bad)  # the one host-device sync per optimiser step

    def _handle_bad_step(self, grad_norm: Any) -> None:
        step = self.state.global_step + 1
        self.bad_steps += 1
        what = f"optimiser step {step}: non-finite loss or gradient norm (grad_norm {float(grad_norm):g})"
        if self.bad_steps > self.max_bad_steps:
            raise TrainingDivergedError(
                f"Training diverged at {what}; no update, adapter or checkpoint from it was saved. Lower "
                f"train.learning_rate (or raise train.max_bad_steps, now {self.max_bad_steps}, to skip a few "
                f"bad steps)."
            )
        logger.warning(
            "Skipping %s (bad step %d of at most %d, train.max_bad_steps).",
            what,
            self.bad_steps,
            self.max_bad_steps,
        )
        self.optimizer.zero_grad(set_to_none=True)  # the optimiser skips parameters without gradients

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The parent's ``train``, with ``bad_steps`` (skipped optimiser steps) in the returned metrics."""
        self.bad_steps = 0
        self._loss_not_finite = None
        output = super().train(*args, **kwargs)
        output.metrics["bad_steps"] = self.bad_steps
        train_loss = output.metrics.get("train_loss")
        if train_loss is not None and not torch.isfinite(torch.tensor(float(train_loss))):
            raise TrainingDivergedError(f"Training finished with a non-finite train_loss ({train_loss}).")
        return output

    def save_model(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        """The parent's ``save_model`` (final adapter and every checkpoint), refused with
        :class:`TrainingDivergedError` if a trainable tensor or a buffer holds a NaN or an infinity."""
        bad = non_finite_parameters(self.model)
        if self.args.world_size > 1:  # sharded parameters: each process checks its shards
            count = torch.tensor(len(bad), device=self.args.device)
            total = int(self.accelerator.reduce(count, reduction="sum"))
        else:
            total = len(bad)
        if total:
            target = str(output_dir or self.args.output_dir).replace(f"{os.sep}{STAGING_DIR}{os.sep}", os.sep)
            shown = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else ""
            raise TrainingDivergedError(
                f"Refusing to save {target}: {total} trainable tensor(s) or buffer(s) hold "
                f"NaN or infinite values{shown}. Lower train.learning_rate."
            )
        super().save_model(output_dir, *args, **kwargs)

    # ---- logging ---------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds aux loss, tokens/s and router statistics to training logs (those carrying ``loss``)."""
        if "loss" in logs:
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            # Every process sees a similar share of tokens; report the whole job's throughput.
            logs["tokens_per_second"] = round(self._tokens_since_log * self.args.world_size / elapsed, 1)
            self._tokens_since_log, self._last_log_time = 0, now
            if self._aux_count:
                logs["aux_loss"] = round(float(self._aux_sum) / self._aux_count, 6)
                self._aux_sum, self._aux_count = 0.0, 0
            if self._router_stats is not None:
                summary = self._router_stats.summary()
                self._router_stats.reset()
                if summary:
                    logs.update(_aggregate_router_stats(summary))
                    self._write_router_layers(summary)
        super().log(logs, *args, **kwargs)

    def _write_router_layers(self, summary: dict[str, dict[str, Any]]) -> None:
        if not self.is_world_process_zero():
            return
        for callback in self.callback_handler.callbacks:
            writer = (
                getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            )
            if writer is None:
                continue
            step = self.state.global_step
            for name, entry in summary.items():
                tag = name.replace("base_model.model.", "")
                writer.add_scalar(f"router/{tag}/entropy", entry["entropy"], step)
                writer.add_scalar(f"router/{tag}/active_experts", entry["active"], step)
                writer.add_scalar(f"router/{tag}/load_max", max(entry["load"]), step)
                writer.add_scalar(f"router/{tag}/load_min", min(entry["load"]), step)
                writer.add_histogram(f"router/{tag}/load", torch.tensor(entry["load"]), step)
            writer.flush()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Evaluation with router statistics paused (they describe training tokens only)."""
        if self._router_stats is not None:
            self._router_stats.disable()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if self._router_stats is not None:
                self._router_stats.enable()

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint into ``<run>/.staging/`` then rename it to ``<run>/checkpoint-N``."""
        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # leftovers of an interrupted save
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            _fsync_dir(run_dir)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == staging:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        keep = {self.state.best_model_checkpoint} if self.state.best_model_checkpoint else set()
        checkpoints = [str(p) for p in complete_checkpoints(run_dir)]
        excess = len(checkpoints) - limit
        for path in checkpoints:
            if excess <= 0:
                break
            if path in keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1


class ComolTrainer(ComolTrainerMixin, Trainer):
    """``transformers.Trainer`` with comol's auxiliary losses, router logging and atomic checkpoints."""


def sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with :class:`ComolTrainerMixin` (imported lazily: TRL is optional)."""
    from trl import SFTTrainer

    return type("ComolSFTTrainer", (ComolTrainerMixin, SFTTrainer), {"__doc__": ComolTrainer.__doc__})


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters and floating-point buffers (e.g. a router's balancing bias) with a
    NaN or infinite entry; of a sharded parameter, this process's shard is checked."""
    bad = []
    tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, param in tensors:
        data = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO-3: the local partition
        if data is None:
            data = param.detach()
            data = data.to_local() if hasattr(data, "to_local") else data  # FSDP2 DTensor: the local shard
        if data.numel() and not bool(torch.isfinite(data).all()):
            bad.append(name)
    return bad


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-N`` directories of a run, oldest (smallest N) first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _aggregate_router_stats(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    entropies = [entry["entropy"] for entry in summary.values()]
    loads = [load for entry in summary.values() for load in entry["load"]]
    active = [entry["active"] for entry in summary.values()]
    return {
        "router_entropy": round(sum(entropies) / len(entropies), 4),
        "router_active_experts": round(sum(active) / len(active), 4),
        "router_load_max": round(max(loads), 4),
        "router_load_min": round(min(loads), 4),
    }


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
