"""The run directory: what may be written into it, which checkpoint to resume from (complete, with an unchanged
config), atomic writes, the saved adapter and ``run_info.json``.

A run directory holds ``config.yaml``, ``run_info.json``, ``checkpoint-N/``, ``runs/`` (TensorBoard),
``metrics.json`` and ``adapter/`` (see :mod:`comol.training.run`). A fresh run never replaces one that
already produced checkpoints, an adapter or metrics unless asked to (``overwrite``); a resumed run starts
only from a complete checkpoint and only with the saved config, up to :data:`RESUMABLE_KEYS`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comol.errors import UserError
from comol.training.config import RESUMABLE_KEYS
from comol.training.trainer import STAGING_DIR, complete_checkpoints, last_checkpoint

if TYPE_CHECKING:
    from transformers import Trainer

    from comol.training.config import TrainConfig

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")


# Files and directories a run writes, removed by ``overwrite`` (nothing else in the directory is touched).
_RUN_OUTPUTS: tuple[str, ...] = (
    ADAPTER_DIR,
    f".{ADAPTER_DIR}.tmp",
    CONFIG_FILE,
    RUN_INFO_FILE,
    METRICS_FILE,
    "runs",
    STAGING_DIR,
)
_TRAINER_STATE = "trainer_state.json"


def check_output_dir(output_dir: Path) -> None:
    """Fail if ``train.output_dir`` (or a parent of it) exists and is not a directory."""
    for path in (output_dir, *output_dir.parents):
        if path.exists() and not path.is_dir():
            raise UserError(f"train.output_dir {output_dir}: {path} is a file; choose a directory.")


def run_outputs(output_dir: Path) -> list[str]:
    """What of a run's results ``output_dir`` holds: ``checkpoint-N`` directories, ``adapter/``, ``metrics.json``."""
    if not output_dir.is_dir():
        return []
    found = [p.name for p in complete_checkpoints(output_dir)]
    if (output_dir / ADAPTER_DIR).exists():
        found.append(f"{ADAPTER_DIR}/")
    if (output_dir / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    return found


def resume_checkpoint(
    output_dir: Path, resume: bool | str | os.PathLike, overwrite: bool = False
) -> Path | None:
    """The checkpoint a run starts from (None: from scratch), after checking ``resume`` against ``output_dir``.

    Args:
        output_dir: the run directory.
        resume: ``True``: the newest complete checkpoint in ``output_dir`` (None if the directory holds no
            run yet); a path: that checkpoint (``output_dir`` must be its run's directory or hold no run);
            ``False``: none, and ``output_dir`` must hold no run's results
            (checkpoints, ``adapter/``, ``metrics.json``) unless ``overwrite``.
        overwrite: a fresh start may replace the run in ``output_dir`` (see :func:`clear_run`).

    Raises:
        UserError: a fresh start over an earlier run without ``overwrite``, ``resume`` with ``overwrite``,
            a run without checkpoints to resume, or a checkpoint that is incomplete or damaged
            (:func:`check_checkpoint`).
    """
    if resume is not False and overwrite:
        raise UserError("Give --resume or --overwrite, not both.")
    if resume is False:
        existing = run_outputs(output_dir)
        if existing and not overwrite:
            raise UserError(
                f"{output_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another train.output_dir."
            )
        return None
    if resume is True:
        found = last_checkpoint(output_dir)
        if found is None:
            existing = run_outputs(output_dir)
            if existing:
                raise UserError(
                    f"{output_dir} holds a run without checkpoints ({', '.join(existing)}): nothing to resume. "
                    "Pass --overwrite (without --resume) to replace it, or choose another train.output_dir."
                )
            logger.warning("No complete checkpoint in %s; starting afresh.", output_dir)
            return None
        check_checkpoint(found)
        return found
    path = Path(resume)
    check_checkpoint(path)
    existing = run_outputs(output_dir)
    if existing and path.resolve().parent != output_dir.resolve():
        raise UserError(
            f"{output_dir} already holds another run ({', '.join(existing)}) than the one of {path}; choose "
            "another train.output_dir to continue that checkpoint in."
        )
    return path


def check_checkpoint(path: Path) -> None:
    """Fail unless ``path`` is a complete, readable checkpoint written by ``transformers.Trainer``.

    Complete means what resuming restores: the trainer state (``trainer_state.json``, valid JSON), the
    adapter weights (``adapter_model.safetensors`` or ``.bin``), the optimizer (``optimizer.pt``), the
    scheduler (``scheduler.pt``) and the RNG state (``rng_state.pth``, or ``rng_state_<rank>.pth`` per
    process). Under FSDP the weights and optimizer may be sharded directories (``pytorch_model_fsdp_*``,
    ``optimizer_*``); under DeepSpeed they are in its ``global_step*`` directory, which also holds the
    scheduler. Files written by ``torch.save`` are checked against their CRCs and safetensors files against
    their headers, so a truncated or damaged file is named here instead of failing inside the Trainer.

    Raises:
        UserError: the missing or damaged file, and what to do.
    """
    if not path.is_dir():
        raise UserError(f"Checkpoint {path} is not a directory.")
    state = path / _TRAINER_STATE
    if not state.is_file():
        raise UserError(f"{path} is not a complete checkpoint: {_TRAINER_STATE} is missing.{_REMEDY}")
    try:
        parsed = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{state} is damaged ({err}).{_REMEDY}") from err
    if not isinstance(parsed, dict) or "global_step" not in parsed:
        raise UserError(f"{state} is damaged (no global_step).{_REMEDY}")
    names = {p.name for p in path.iterdir()}
    directories = {n for n in names if (path / n).is_dir()}
    deepspeed = any(n.startswith("global_step") for n in directories)  # weights, optimizer and scheduler
    fsdp_weights = any(n.startswith("pytorch_model_fsdp") for n in directories)
    fsdp_optimizer = any(n.startswith("optimizer") for n in directories)
    rng_files = sorted(n for n in names if re.fullmatch(r"rng_state(_\d+)?\.pth", n))
    # (what, files that hold it, whether a sharded directory holds it instead)
    required: list[tuple[str, list[str], bool]] = [
        (
            "the adapter weights",
            ["adapter_model.safetensors", "adapter_model.bin"],
            deepspeed or fsdp_weights,
        ),
        ("the optimizer state", ["optimizer.pt", "optimizer.bin"], deepspeed or fsdp_optimizer),
        ("the scheduler state", ["scheduler.pt"], deepspeed),
        ("the RNG state", rng_files or ["rng_state.pth"], False),
    ]
    for what, candidates, elsewhere in required:
        present = [n for n in candidates if n in names]
        for name in present:
            _check_file(path / name)
        if not present and not elsewhere:
            raise UserError(
                f"{path} is not a complete checkpoint: {candidates[0]} ({what}) is missing, so resuming would "
                f"silently start it afresh.{_REMEDY}"
            )


_REMEDY = (
    " Resume from an earlier checkpoint (--resume-from RUN_DIR/checkpoint-N), or remove this one to let "
    "--resume pick the newest remaining."
)


def _check_file(path: Path) -> None:
    # torch.save writes zip archives with CRCs; a safetensors file starts with a header giving its layout.
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                handle.keys()
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
        raise UserError(f"{path} is damaged or truncated ({err}).{_REMEDY}") from err
    if bad is not None:
        raise UserError(f"{path} is damaged (checksum mismatch in {bad}).{_REMEDY}")


def check_resume_config(
    config: TrainConfig, checkpoint: Path | None, allow_change: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Compare the config of a resumed run with the one saved beside its checkpoint.

    Only the keys of :data:`RESUMABLE_KEYS` may change (e.g. a larger ``train.max_steps`` to continue a
    run); any other change would make ``config.yaml`` describe an adapter the run did not train.

    Args:
        config: the config of this invocation.
        checkpoint: the checkpoint resumed from (None: a fresh start, nothing to compare).
        allow_change: accept changes of other keys too (they are then recorded in ``run_info.json``).

    Returns:
        Every changed key with its ``(saved, new)`` values.

    Raises:
        UserError: a change outside :data:`RESUMABLE_KEYS` without ``allow_change``, naming the keys; or an
            unreadable saved config.
    """
    if checkpoint is None:
        return {}
    saved_path = checkpoint.parent / CONFIG_FILE
    if not saved_path.is_file():
        logger.warning(
            "No %s beside %s: cannot check that the run's config is unchanged.", CONFIG_FILE, checkpoint
        )
        return {}
    from comol.training.config import load_config

    try:
        saved = load_config(saved_path).to_dict()
    except ValueError as err:
        if not allow_change:
            raise UserError(
                f"Cannot read the saved config of the resumed run, {saved_path}: {err} Pass "
                "--allow-config-change to resume with the current config anyway."
            ) from err
        logger.warning("Cannot read %s (%s); resuming with the current config.", saved_path, err)
        saved = {}
    old, new = _flatten(saved), _flatten(config.to_dict())
    changed = {
        k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    }
    altering = [k for k in changed if k not in RESUMABLE_KEYS]
    if altering and not allow_change:
        listed = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in altering)
        raise UserError(
            f"--resume with a config that differs from the run's {saved_path} ({listed}). Resume with the saved "
            f"config (comol train --resume {saved_path}), change only {', '.join(RESUMABLE_KEYS)}, or pass "
            "--allow-config-change to continue with the new values (recorded in run_info.json)."
        )
    for key, (before, after) in changed.items():
        logger.warning("Resuming with %s changed: %r -> %r.", key, before, after)
    return changed


def resumed_run_info(
    output_dir: Path, info: dict[str, Any], checkpoint: Path, changes: dict[str, tuple[Any, Any]]
) -> dict[str, Any]:
    """``run_info.json`` of a resumed run: the first run's record with this resume appended under ``resumes``.

    Each entry names the checkpoint, the command line, commit and world size of the resume, and every config
    key that changed with its saved and new values (``config.yaml`` then holds the new ones).
    """
    previous: dict[str, Any] | None = None
    path = output_dir / RUN_INFO_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("%s is unreadable (%s); writing a new one.", path, err)
    record = dict(previous) if isinstance(previous, dict) else dict(info)
    entry = {
        "checkpoint": str(checkpoint),
        "argv": info["argv"],
        "git_commit": info["git_commit"],
        "world_size": info["world_size"],
        "config_changes": {k: {"saved": before, "new": after} for k, (before, after) in changes.items()},
    }
    record["resumes"] = [*record.get("resumes", []), entry]
    return record


def clear_run(output_dir: Path) -> None:
    """Remove what a run wrote into ``output_dir`` (checkpoints, adapter, config, logs, metrics), nothing else."""
    if not output_dir.is_dir():
        return
    doomed = [output_dir / name for name in _RUN_OUTPUTS]
    doomed += [p for p in output_dir.iterdir() if _CHECKPOINT_NAME.match(p.name)]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.info("Replaced the earlier run in %s.", output_dir)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


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
