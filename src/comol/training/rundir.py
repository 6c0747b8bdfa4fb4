"""The run directory: which checkpoint to resume from, atomic writes, the saved adapter and ``run_info.json``.

A run directory holds ``config.yaml``, ``run_info.json``, ``checkpoint-N/``, ``runs/`` (TensorBoard),
``metrics.json`` and ``adapter/`` (see :mod:`comol.training.run`).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from comol.training.trainer import last_checkpoint

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.json"


def resume_checkpoint(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """The checkpoint a run starts from (None: from scratch), after checking ``resume`` against ``output_dir``.

    Args:
        output_dir: the run directory.
        resume: ``True``: the newest complete checkpoint in ``output_dir`` (None if there is none); a path:
            that checkpoint; ``False``: none, and ``output_dir`` must not hold checkpoints.

    Raises:
        ValueError: a fresh start into a directory with checkpoints, or a path that is not a checkpoint.
    """
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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_adapter(trainer: Trainer, target: Path) -> Path:
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
