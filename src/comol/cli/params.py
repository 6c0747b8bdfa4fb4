"""``comol params``: count a method's trainable parameters on a model without loading its weights."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "params",
        help="count trainable parameters (model built on the meta device, no weights loaded)",
        description="Count the trainable parameters of METHOD on MODEL. The model is built from its config on "
        "PyTorch's meta device and the real adapter is injected with peft, so no weights are loaded or "
        "downloaded. Defaults follow the CoMoL paper: targets q, k, v, o, down projections; lora_alpha = r.",
    )
    parser.add_argument(
        "--model", required=True, help="preset (qwen3-8b, qwen3-14b, llama-3.1-8b) or path to a config.json"
    )
    parser.add_argument("--method", required=True, help="method name, e.g. lora, comol, molora, flylora")
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


def run(args: argparse.Namespace) -> int:
    from comol.params import count_params

    try:
        options = _options(args)
        result = count_params(args.model, args.method, **options)
    except ValueError as err:
        print(f"comol params: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": str(args.model), **result.as_dict()}))
    else:
        print(
            f"{args.method} on {args.model}: {result.trainable:,} trainable parameters "
            f"({result.trainable / 1e6:.2f}M) in {result.adapted_modules} adapted modules"
            + (f"; {result.frozen_adapter:,} frozen adapter values" if result.frozen_adapter else "")
        )
    return 0
