"""``comol inspect``: pictures of what an adapter's routers do on some data (expert load, gate entropy,
active experts, the dominant expert of every token), written with their numbers into one directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="router pictures: expert load heatmap, gate entropy, dominant expert per token",
        description="Run a comol adapter over records of --data and write into --out: router_load.png (expert "
        "load, routers x experts), router_entropy.png (gate entropy and active experts per router), "
        "router_tokens.html (the dominant expert of every token for the first --examples records) and "
        "router_report.json (the numbers, as comol.RouterStats reports them).",
    )
    parser.add_argument("--model", required=True, help="hub id or local directory of the base model")
    parser.add_argument("--adapter", required=True, help="directory of a saved comol adapter")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a .json/.jsonl file of records: 'text', or 'instruction' (+ 'input', 'output')",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--limit", type=int, help="use only the first N records")
    parser.add_argument("--examples", type=int, default=3, help="records shown token by token in the HTML")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per record at most")
    parser.add_argument(
        "--template", default="alpaca", choices=("alpaca",), help="prompt template of records"
    )
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from comol.errors import UserError
    from comol.evaluation.router_report import FILES, collect_router_report, read_texts, write_router_report

    for name, value in (
        ("--limit", args.limit),
        ("--examples", args.examples),
        ("--max-length", args.max_length),
    ):
        if value is not None and value < (0 if name == "--examples" else 1):
            raise UserError(f"{name} must be positive, got {value}.")
    existing = [name for name in FILES.values() if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"{args.out} already holds {', '.join(existing)}; pass --overwrite or choose another --out."
        )
    if not Path(args.adapter, "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {args.adapter} has no adapter_config.json (give a saved adapter directory)."
        )
    texts = read_texts(args.data, limit=args.limit, template=args.template)  # before loading the model

    from comol.evaluation.generation import load_model

    model, tokenizer = load_model(
        args.model, args.adapter, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device
    )
    report = collect_router_report(
        model, tokenizer, texts, max_length=args.max_length, examples=args.examples
    )
    meta = {"model": args.model, "adapter": str(args.adapter), "data": str(args.data)}
    paths = write_router_report(report, args.out, meta=meta)
    sys.stdout.write(
        f"Inspected {len(report.routers)} routers over {report.texts} records; wrote "
        + ", ".join(str(p) for p in paths.values())
        + "\n"
    )
    return 0
