"""One sweep run: train (as ``comol train``), evaluate the adapter, measure its routers.

:func:`execute_run` is the job function: a module-level function of a picklable :class:`RunSpec`, so it runs
in-process, under ``submitit`` (Slurm or its local executors) alike. Training is
:func:`comol.training.run.train` in-process, or ``accelerate launch --config_file F -m comol train`` as a
subprocess (``launcher="accelerate"``). Evaluation is :func:`comol.evaluation.runner.evaluate_math` /
``evaluate_code``, the functions behind ``comol eval``, given the in-memory model.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from comol.evaluation.runner import ModelOptions
from comol.sweep.plan import BASE_LABEL, RunSpec


class LoadedModel(ModelOptions):
    """:class:`ModelOptions` whose ``load`` returns a model already in memory (no second load)."""

    def __init__(self, model: Any, tokenizer: Any, **options: Any) -> None:
        super().__init__(model="<in memory>", **options)
        self._loaded = (model, tokenizer)

    def load(self) -> tuple[Any, Any]:
        return self._loaded


def accelerate_command(spec: RunSpec, accelerate_config: str) -> list[str]:
    """The ``accelerate launch`` command line of one run's training (resuming an interrupted one)."""
    config = [spec.config_path] if spec.config_path else []
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
        "-m", "comol", "train", "--resume", *config, *spec.overrides,
    ]  # fmt: skip


def _train(spec: RunSpec, launcher: str, accelerate_config: str | None) -> tuple[Any, Any, dict[str, Any]]:
    """Train the run; return ``(model, tokenizer, train metrics)``."""
    from comol.training.config import load_config

    config = load_config(spec.config_path, list(spec.overrides))
    if spec.label == BASE_LABEL:
        return config.model.load_model(), _tokenizer(config), {}
    if launcher == "accelerate":
        if accelerate_config is None:
            raise ValueError("--launcher accelerate needs --accelerate-config FILE.")
        subprocess.run(accelerate_command(spec, accelerate_config), check=True)
        import json

        from peft import PeftModel

        import comol  # noqa: F401  (registers the methods with peft)

        run_dir = Path(spec.run_dir)
        model = PeftModel.from_pretrained(config.model.load_model(), run_dir / "adapter")
        return model, _tokenizer(config), json.loads((run_dir / "metrics.json").read_text())
    from comol.training.run import train

    result = train(config, resume=True)
    return result.model, result.tokenizer, dict(result.metrics)


def _tokenizer(config: Any) -> Any:
    tokenizer = config.model.load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def trainable_parameters(model: Any, run_dir: Path) -> int:
    """Trainable parameters: ``requires_grad`` tensors of a trained model, else the saved adapter's tensors."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if count == 0 and adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return count


def router_summary(model: Any, tokenizer: Any, prompts: list[str]) -> dict[str, Any] | None:
    """Router entropy (normalised by log E) and largest expert load over ``prompts``; None without routers.

    Returns:
        ``{"entropy": mean over routers of H / log E, "max_load": the largest expert share of any router,
        "mean_max_load": mean over routers of its largest share, "routers": count}``.
    """
    import torch

    from comol.mixture import RouterStats

    try:
        stats = RouterStats(model)
    except ValueError:
        return None
    was_training = model.training
    model.eval()
    try:
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(prompts), 8):
                model(**{k: v[start : start + 8].to(device) for k, v in batch.items()})
    finally:
        stats.close()
        model.train(was_training)
    entropies, max_loads = [], []
    for entry in stats.summary().values():
        load = entry["load"]
        if len(load) < 2:
            continue
        total = sum(load) or 1.0
        entropies.append(entry["entropy"] / math.log(len(load)))
        max_loads.append(max(load) / total)
    if not entropies:
        return None
    return {
        "entropy": sum(entropies) / len(entropies),
        "max_load": max(max_loads),
        "mean_max_load": sum(max_loads) / len(max_loads),
        "routers": len(entropies),
    }


def _evaluate(spec: RunSpec, model: Any, tokenizer: Any, template: str) -> dict[str, Any]:
    from comol.evaluation.runner import evaluate_code, evaluate_math

    ev = spec.evaluation
    options = {"batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens, "seed": 0, "progress": False}
    metrics: dict[str, Any] = {}
    eval_dir = Path(spec.run_dir) / "eval"
    if ev.math_data:
        summary = evaluate_math(
            list(ev.math_data),
            model=LoadedModel(model, tokenizer, **options),
            template=template,
            limit=ev.limit,
            output_dir=eval_dir / "math",
        )
        for name, entry in summary["datasets"].items():
            metrics[name] = 100 * entry["accuracy"]
    if ev.code:
        summary = evaluate_code(
            model=LoadedModel(model, tokenizer, **options),
            problems=ev.code_problems,
            n=ev.code_n,
            limit=ev.limit,
            output_dir=eval_dir / "code",
            progress=False,
            isolation=ev.code_isolation,
        )
        for key in sorted(k for k in summary if k.startswith("pass@")):
            metrics[key] = 100 * summary[key]
    return metrics


def _router_prompts(spec: RunSpec, tokenizer: Any, template: str) -> list[str]:
    from comol.data.prompts import render_prompt
    from comol.evaluation.math import data as math_data

    if not spec.evaluation.math_data:
        return []
    _, source = math_data.parse_data_spec(spec.evaluation.math_data[0])
    examples = math_data.load_examples(source, limit=spec.evaluation.router_prompts)
    return [render_prompt(e, template, tokenizer) for e in examples]


def execute_run(
    spec: RunSpec, launcher: str = "inprocess", accelerate_config: str | None = None
) -> dict[str, Any]:
    """Train and evaluate one run; never raises: a failure is returned as ``status="failed"`` with its error.

    Returns:
        ``{"run_id", "label", "group", "grid", "seed", "run_dir", "status", "metrics": {column: %},
        "train_loss", "params", "router", "wall_s", "error"}``.
    """
    from comol.training.config import load_config

    start = time.perf_counter()
    record: dict[str, Any] = {
        "run_id": spec.run_id, "label": spec.label, "group": spec.group, "grid": dict(spec.grid),
        "seed": spec.seed, "run_dir": spec.run_dir, "status": "failed", "metrics": {}, "train_loss": None,
        "params": None, "router": None, "error": None,
    }  # fmt: skip
    try:
        template = load_config(spec.config_path, list(spec.overrides)).data.template
        model, tokenizer, train_metrics = _train(spec, launcher, accelerate_config)
        loss = train_metrics.get("train_loss")
        record["train_loss"] = loss
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss}; the adapter is not evaluated.")
        if spec.label != BASE_LABEL:
            record["params"] = trainable_parameters(model, Path(spec.run_dir))
            record["router"] = router_summary(model, tokenizer, _router_prompts(spec, tokenizer, template))
        else:
            record["params"] = 0
        record["metrics"] = _evaluate(spec, model, tokenizer, template)
        record["status"] = "ok"
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    record["wall_s"] = time.perf_counter() - start
    return record
