"""``comol params``: count a method's trainable parameters on a model without loading its weights, or
(``--paper-table``) every "Param" figure of the CoMoL paper."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The counting options, which --paper-table does not take (each paper row has its own settings).
COUNT_OPTIONS = (
    "model",
    "method",
    "r",
    "lora_alpha",
    "num_experts",
    "top_k",
    "no_core_router",
    "target_modules",
    "option",
    "json",
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "params",
        help="count trainable parameters (model built on the meta device, no weights loaded)",
        description="Count the trainable parameters of METHOD on MODEL. The model is built from its config on "
        "PyTorch's meta device and the real adapter is injected with peft, so no weights are loaded or "
        "downloaded. Defaults follow the CoMoL paper: targets q, k, v, o, down projections; lora_alpha = r. "
        "With --paper-table, count every 'Param' figure of the paper's Tables 2-5 instead.",
    )
    parser.add_argument(
        "--model", help="preset (qwen3-8b, qwen3-14b, llama-3.1-8b) or path to a config.json (required)"
    )
    parser.add_argument("--method", help="method name, e.g. lora, comol, molora, flylora (required)")
    parser.add_argument("--r", type=int, help="LoRA rank r")
    parser.add_argument("--lora-alpha", type=float, help="scaling numerator (default: r)")
    parser.add_argument("--num-experts", type=int, help="number of experts E")
    parser.add_argument("--top-k", type=int, help="experts (or ranks, for flylora) kept per token")
    parser.add_argument("--no-core-router", action="store_true", help="comol: route on x ('CoMoL w/o CR')")
    parser.add_argument("--target-modules", nargs="+", help="module names to adapt (default: q k v o down)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other config field of the method (repeatable); values are parsed as JSON when possible",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    paper = parser.add_argument_group("the paper's Param columns (instead of --model/--method)")
    paper.add_argument(
        "--paper-table",
        action="store_true",
        help="count every Param figure of the paper's Tables 2-5 and print the Markdown table of README.md",
    )
    paper.add_argument(
        "--by-depth",
        action="store_true",
        help="with --paper-table: count on 1-3 layer copies of each model and extrapolate (same counts, faster)",
    )
    paper.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="with --paper-table: write the table into this Markdown file, between its "
        "<!-- paper-table:start --> and <!-- paper-table:end --> lines",
    )
    parser.set_defaults(func=run)
    return parser


def _options(args: argparse.Namespace) -> dict:
    from comol.params import parse_options

    options = {}
    if args.r is not None:
        options["r"] = args.r
    if args.lora_alpha is not None:
        options["lora_alpha"] = args.lora_alpha
    if args.num_experts is not None:
        options["num_experts"] = args.num_experts
    if args.top_k is not None:
        # routed mixtures call it router_top_k, FlyLoRA (no router) top_k
        options["top_k" if args.method.lower() == "flylora" else "router_top_k"] = args.top_k
    if args.no_core_router:
        options["core_router"] = False
    if args.target_modules:
        options["target_modules"] = list(args.target_modules)
    options.update(parse_options(args.option))
    return options


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` set on the command line (defaults are None, False or [])."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) not in (None, False, [])]


def _error(message: str) -> int:
    print(f"comol params: error: {message}", file=sys.stderr)
    return 2


def run_paper_table(args: argparse.Namespace) -> int:
    """Count the paper's rows and print the table, or write it into ``--output``."""
    from comol.params import check_paper_table_file, paper_table, paper_table_markdown, write_paper_table

    if args.output is not None:
        try:
            check_paper_table_file(args.output)  # before the counting, which takes a while
        except ValueError as err:
            return _error(str(err))
    table = paper_table_markdown(paper_table(by_depth=args.by_depth))
    if args.output is None:
        sys.stdout.write(table)
        return 0
    write_paper_table(args.output, table)
    print(f"Wrote the paper table into {args.output}.")
    return 0


def run(args: argparse.Namespace) -> int:
    from comol.params import count_params

    if args.paper_table:
        if given := _given(args, COUNT_OPTIONS):
            return _error(
                f"--paper-table counts each paper row with its own settings; drop {' '.join(given)}."
            )
        return run_paper_table(args)
    if given := _given(args, ("by_depth", "output")):
        return _error(f"{' '.join(given)} only apply to --paper-table.")
    if args.model is None or args.method is None:
        return _error("--model and --method are required (or --paper-table).")
    try:
        options = _options(args)
        result = count_params(args.model, args.method, **options)
    except ValueError as err:
        return _error(str(err))
    if args.json:
        print(json.dumps({"model": str(args.model), **result.as_dict()}))
    else:
        print(
            f"{args.method} on {args.model}: {result.trainable:,} trainable parameters "
            f"({result.trainable / 1e6:.2f}M) in {result.adapted_modules} adapted modules"
            + (f"; {result.frozen_adapter:,} frozen adapter values" if result.frozen_adapter else "")
        )
    return 0
