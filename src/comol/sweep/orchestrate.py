"""The sweep loop: plan, skip finished runs, run the rest (in-process, via ``accelerate launch`` or through
submitit), record each run as it ends, and rewrite ``results.json``, ``results.md`` and the plot each time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comol.errors import UserError
from comol.sweep.execute import execute_run
from comol.sweep.plan import EvalSpec, RunSpec, plan_runs
from comol.sweep.render import write_reports
from comol.sweep.results import load_runs, write_results

logger = logging.getLogger(__name__)

LAUNCHERS = ("inprocess", "accelerate", "submitit")


def run_sweep(
    configs: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    evaluation: EvalSpec,
    overrides: Sequence[str] = (),
    grid: Sequence[str] = (),
    base: bool = False,
    launcher: str = "inprocess",
    accelerate_config: str | None = None,
    submitit_options: dict[str, Any] | None = None,
    compare: str | None = None,
) -> dict[str, Any]:
    """Run every (config, grid point, seed) not already finished in ``out_dir`` and write the results.

    Args:
        configs: ``comol train`` YAML files; each file's stem labels its row.
        seeds: training seeds.
        out_dir: the sweep directory (``results.json``, ``results.md``, ``results.png``, ``runs/``).
        evaluation: how each adapter is evaluated.
        overrides: ``key=value`` overrides for every run.
        grid: ``KEY=V1,V2,...`` settings swept as well (their product).
        base: also evaluate the untuned base model (row ``base``).
        launcher: ``inprocess``, ``accelerate`` (``accelerate launch --config_file accelerate_config``) or
            ``submitit`` (one job per run; Slurm when available, else submitit's local executor).
        accelerate_config: accelerate config file for ``launcher="accelerate"``.
        submitit_options: ``AutoExecutor.update_parameters`` keywords (e.g. ``slurm_partition``) plus
            ``folder`` for submitit's logs.
        compare: ``"paper"`` adds the paper's Tables 2-4 to ``results.md``.

    Returns:
        The content of ``results.json``.

    Raises:
        UserError: bad configs, grid, seeds, launcher or an unreadable earlier results file.
    """
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}.")
    if launcher == "accelerate" and (accelerate_config is None or not Path(accelerate_config).is_file()):
        raise UserError(
            f"--launcher accelerate needs --accelerate-config FILE (an existing file), got {accelerate_config}."
        )
    if compare not in (None, "paper"):
        raise UserError(f"--compare accepts only 'paper', got {compare!r}.")
    out_dir = Path(out_dir)
    specs = plan_runs(configs, seeds, overrides, grid, out_dir, evaluation, base=base)
    previous = load_runs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "configs": list(configs), "seeds": list(seeds), "overrides": list(overrides), "grid": list(grid),
        "evaluation": evaluation.__dict__, "launcher": launcher,
    }  # fmt: skip
    runs = {s.run_id: previous[s.run_id] for s in specs if s.run_id in previous}
    runs.update({k: v for k, v in previous.items() if k not in runs})  # keep runs of other invocations
    todo = [s for s in specs if runs.get(s.run_id, {}).get("status") != "ok"]
    logger.info(
        "Sweep: %d runs, %d finished earlier, %d to run.", len(specs), len(specs) - len(todo), len(todo)
    )

    def record(result: dict[str, Any]) -> dict[str, Any]:
        runs[result["run_id"]] = result
        if result["status"] == "ok":
            logger.info("%s done in %.0f s: %s", result["run_id"], result["wall_s"], result["metrics"])
        else:
            logger.error("%s failed: %s", result["run_id"], result["error"])
        data = write_results(out_dir, runs, settings)
        write_reports(out_dir, data, compare)
        return data

    data = write_results(out_dir, runs, settings)
    write_reports(out_dir, data, compare)
    if launcher == "submitit":
        data = _run_submitit(todo, submitit_options or {}, out_dir, record) or data
    else:
        for spec in todo:
            logger.info("Running %s.", spec.run_id)
            data = record(execute_run(spec, launcher, accelerate_config))
    return data


def _run_submitit(
    todo: list[RunSpec], options: dict[str, Any], out_dir: Path, record: Any
) -> dict[str, Any] | None:
    """Submit one submitit job per run (all at once) and record each result as it arrives."""
    import submitit

    options = dict(options)
    executor = submitit.AutoExecutor(folder=options.pop("folder", out_dir / "submitit"))
    executor.update_parameters(**options)
    jobs = [(spec, executor.submit(execute_run, spec)) for spec in todo]
    data = None
    for spec, job in jobs:
        try:
            result = job.result()
        except Exception as err:
            result = {
                "run_id": spec.run_id, "label": spec.label, "group": spec.group, "grid": dict(spec.grid),
                "seed": spec.seed, "run_dir": spec.run_dir, "status": "failed", "metrics": {},
                "train_loss": None, "params": None, "router": None, "wall_s": 0.0,
                "error": f"submitit job {job.job_id}: {type(err).__name__}: {err}",
            }  # fmt: skip
        data = record(result)
    return data
