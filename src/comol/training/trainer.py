"""``transformers.Trainer`` (and TRL ``SFTTrainer``) with what mixture-of-LoRA training needs.

:class:`ComolTrainerMixin` adds, on top of any ``Trainer`` subclass:

- the methods' auxiliary losses (:func:`comol.mixture.collect_aux_loss`) to the training loss;
- ``aux_loss``, ``tokens_per_second`` and router statistics (mean gate entropy, largest and smallest
  expert load over layers) in every training log, hence on the console and in TensorBoard, plus per-layer
  entropy and load extremes in TensorBoard;
- atomic checkpoints: a checkpoint is written into a staging directory and renamed into place once
  complete, so ``checkpoint-N`` directories are always whole and ``--resume`` never picks a partial one.

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

from comol.mixture import RouterStats, collect_aux_loss, register_step_hooks

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Written last into a checkpoint by the Trainer; its presence marks a complete checkpoint.
COMPLETE_MARKER = "trainer_state.json"


def _router_stats(model: torch.nn.Module) -> RouterStats | None:
    try:
        return RouterStats(model, enabled=True)
    except ValueError:  # no mixture layer: plain LoRA
        return None


class ComolTrainerMixin:
    """Adds auxiliary losses, router statistics, tokens/s and atomic checkpoints to a ``Trainer``.

    Put it first in the bases: ``class MyTrainer(ComolTrainerMixin, Trainer)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        return super().training_step(model, inputs, *args, **kwargs)

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
