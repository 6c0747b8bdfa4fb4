"""lm-evaluation-harness on a comol adapter (``comol eval harness``).

lm-eval's Hugging Face backend (``--model hf``) loads a peft adapter with
``--model_args pretrained=BASE,peft=DIR``; peft can only read a comol adapter once comol's methods are
registered with it, which ``import comol`` does. :func:`run_harness` imports comol, checks the inputs,
and then runs lm-eval's own command line in this process with the base model, the adapter, the tasks
and every other option passed through unchanged, so lm-eval's options, result files (``--output_path``)
and printed summary table are exactly lm-eval's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from comol.errors import UserError

logger = logging.getLogger(__name__)

RESERVED_MODEL_ARGS: frozenset[str] = frozenset({"pretrained", "peft"})
"""``--model_args`` keys that ``--model`` / ``--adapter`` set."""


def _split_model_args(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Take every ``--model_args VALUE`` (or ``--model_args=VALUE``) out of ``extra``.

    Returns:
        ``(model_args, rest)``: the ``key=value`` items, and the other options in their order.
    """
    items: list[str] = []
    rest: list[str] = []
    tokens = list(extra)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("--model_args", "-a"):
            i += 1
            # lm-eval 0.4.9+ takes several space-separated values; older versions one comma-separated one
            while i < len(tokens) and not tokens[i].startswith("-"):
                items += [kv for kv in tokens[i].split(",") if kv]
                i += 1
            continue
        if token.startswith("--model_args="):
            items += [kv for kv in token.split("=", 1)[1].split(",") if kv]
        else:
            rest.append(token)
        i += 1
    return items, rest


def lm_eval_argv(
    model: str,
    tasks: Sequence[str],
    adapter: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The lm-eval command line (without the program name) for a base model with a comol/peft adapter.

    Args:
        model: hub id or local directory of the base model (lm-eval's ``pretrained=``).
        tasks: lm-eval task names (or groups).
        adapter: directory (or hub id) of the saved adapter (lm-eval's ``peft=``).
        extra: other lm-eval options, passed through; ``--model_args`` items are merged after
            ``pretrained=``/``peft=``.

    Returns:
        ``["--model", "hf", "--model_args", "pretrained=...,peft=...", "--tasks", "T1,T2", *extra]``.

    Raises:
        UserError: no task, a ``--model_args`` item that is not ``key=value``, one setting ``pretrained``
            or ``peft``, or an option that ``comol eval harness`` sets itself (``--model``, ``--tasks``).
    """
    tasks = [t.strip() for task in tasks for t in task.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty; give lm-eval task names, e.g. --tasks arc_easy,gsm8k.")
    user_args, rest = _split_model_args(extra)
    for item in user_args:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model_args {item!r}: expected key=value items, e.g. dtype=bfloat16.")
        if key in RESERVED_MODEL_ARGS:
            raise UserError(
                f"--model_args {key}=...: set by comol; use --model BASE and --adapter DIR instead."
            )
    for token in rest:
        option = token.split("=", 1)[0]
        if option in ("--model", "-M", "--tasks", "-t"):
            raise UserError(
                f"{option} given twice; comol eval harness takes --model BASE and --tasks T1,T2 once."
            )
    model_args = [f"pretrained={model}"] + ([f"peft={adapter}"] if adapter else []) + user_args
    return ["--model", "hf", "--model_args", ",".join(model_args), "--tasks", ",".join(tasks), *rest]


def _check_adapter(adapter: str) -> None:
    """A local adapter directory is checked with :func:`comol.mixture.check_adapter_dir` (a hub id is not)."""
    from comol.mixture import check_adapter_dir

    path = Path(adapter).expanduser()
    if path.is_dir():
        check_adapter_dir(path)
    elif path.exists() or adapter.startswith(("/", ".", "~")):
        raise UserError(f"--adapter {adapter}: not an adapter directory (no such directory).")


def run_harness(
    model: str,
    tasks: Sequence[str],
    adapter: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Run lm-evaluation-harness on ``model`` (+ ``adapter``), as lm-eval's own CLI does.

    lm-eval writes its results (and ``--log_samples`` samples) under ``--output_path`` and prints its
    summary table on stdout.

    Args:
        model: hub id or local directory of the base model.
        tasks: lm-eval task names (comma-separated items are split).
        adapter: saved adapter directory (comol's methods or any peft method).
        extra: any other lm-eval option (``--num_fewshot 5``, ``--batch_size 8``, ``--output_path DIR``,
            ``--include_path DIR``, ``--model_args dtype=bfloat16``, ...).

    Raises:
        UserError: lm-eval is not installed, the inputs are bad (see :func:`lm_eval_argv`), or lm-eval
            rejected them (an unknown task, a bad option value, a missing file: its ``ValueError`` or
            ``OSError``, message prefixed with ``lm-eval:``).
    """
    argv = lm_eval_argv(model, tasks, adapter, extra)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise UserError(f'comol eval harness needs lm-eval: pip install "comol[harness]" ({err}).') from err

    import comol  # noqa: F401  (registers comol's methods with peft before lm-eval loads the adapter)

    if adapter:
        _check_adapter(adapter)

    if (
        "--output_path" not in argv
        and "-o" not in argv
        and not any(a.startswith("--output_path=") for a in argv)
    ):
        logger.warning("No --output_path: lm-eval's results are printed but not saved.")
    logger.info("lm-eval %s", " ".join(argv))
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ValueError, OSError) as err:
        # lm-eval reports bad options, unknown tasks and missing files this way; --verbose shows where
        raise UserError(f"lm-eval: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    finally:
        sys.argv = saved
