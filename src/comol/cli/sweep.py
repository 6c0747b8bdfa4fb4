"""``comol sweep CONFIG... --seeds 0 125 1225 --eval math --data NAME=PATH ... --out DIR``: a results table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from comol.cli.eval import ISOLATION_CHOICES

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep",
        help="train and evaluate configs x seeds (x grid); a mean ± std results table, resumable",
        description=(
            "For each CONFIG (a `comol train` YAML file; its stem labels the row), grid point and seed: train "
            "as `comol train` does, evaluate the adapter as `comol eval` does, and write DIR/results.json, "
            "DIR/results.md (rows = methods, columns = datasets, Average, Param; mean ± std) and "
            "DIR/results.png. Finished runs are not repeated; a failed run is recorded and the sweep goes on."
        ),
        epilog=(
            "examples:\n"
            "  comol sweep configs/math14k/qwen3-8b/{lora,comol}.yaml --seeds 0 125 1225 \\\n"
            "      --eval math --data gsm8k=data/gsm8k.json --data svamp=data/svamp.json --out sweeps/table2\n"
            "  comol sweep configs/.../comol.yaml --seeds 0 125 --grid adapter.r=4,8,16,32 ... --out sweeps/fig2\n"
            "  comol sweep ... --launcher accelerate --accelerate-config multi_gpu.yaml\n"
            "  comol sweep ... --launcher submitit --submitit slurm_partition=gpu --submitit gpus_per_node=1\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "items", nargs="+", metavar="CONFIG|KEY=VALUE", help="config files, then overrides for every run"
    )
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="training seeds, e.g. 0 125 1225")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (re-use it to resume)")
    parser.add_argument(
        "--eval", action="append", choices=("math", "code"), default=[], help="evaluations (repeatable)"
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="NAME=PATH", help="math dataset (repeatable)"
    )
    parser.add_argument("--problems", help="--eval code: HumanEval-format problems file")
    parser.add_argument("--n", type=int, default=1, help="--eval code: samples per problem")
    parser.add_argument(
        "--isolation", default="auto", choices=ISOLATION_CHOICES,
        help="--eval code: sandbox policy (see comol eval code --help)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each dataset")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="swept setting (repeatable)"
    )
    parser.add_argument(
        "--base", action="store_true", help="also evaluate the untuned base model (row 'base')"
    )
    parser.add_argument("--launcher", default="inprocess", choices=("inprocess", "accelerate", "submitit"))
    parser.add_argument("--accelerate-config", help="accelerate config file for --launcher accelerate")
    parser.add_argument(
        "--submitit", action="append", default=[], metavar="KEY=VALUE",
        help="submitit AutoExecutor parameter (e.g. slurm_partition=gpu, timeout_min=600, folder=logs)",
    )  # fmt: skip
    parser.add_argument("--compare", choices=("paper",), help="add the paper's Tables 2-4 to results.md")
    parser.set_defaults(func=run, extra_args=True)  # KEY=VALUE overrides may also follow the options
    return parser


def _submitit_options(items: list[str]) -> dict[str, object]:
    from comol.errors import UserError

    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--submitit {item!r}: write --submitit KEY=VALUE (e.g. slurm_partition=gpu).")
        options[key] = int(value) if value.isdigit() else value
    return options


def run(args: argparse.Namespace) -> int:
    from comol.errors import UserError
    from comol.sweep import EvalSpec, run_sweep

    unknown = [i for i in args.extra_args if i.startswith("-") or "=" not in i]
    if unknown:
        raise UserError(
            f"comol sweep: unrecognized argument(s) {' '.join(unknown)}; it takes CONFIG files, KEY=VALUE "
            "overrides and the options of `comol sweep --help`."
        )
    configs = [i for i in args.items if "=" not in i or Path(i).is_file()]
    overrides = [i for i in args.items if i not in configs] + list(args.extra_args)
    if "math" in args.eval and not args.data:
        raise UserError("--eval math needs at least one --data NAME=PATH.")
    if args.data and "math" not in args.eval:
        raise UserError("--data is given without --eval math; add --eval math.")
    evaluation = EvalSpec(
        math_data=tuple(args.data),
        code="code" in args.eval,
        code_problems=args.problems,
        code_n=args.n,
        code_isolation=args.isolation,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    data = run_sweep(
        configs,
        args.seeds,
        args.out,
        evaluation,
        overrides=overrides,
        grid=args.grid,
        base=args.base,
        launcher=args.launcher,
        accelerate_config=args.accelerate_config,
        submitit_options=_submitit_options(args.submitit),
        compare=args.compare,
    )
    failed = [r["run_id"] for r in data["runs"] if r["status"] != "ok"]
    logger.info("Results: %s", args.out / "results.md")
    if failed:
        logger.error(
            "%d run(s) failed: %s (see results.md; re-run the same command to retry them).",
            len(failed),
            ", ".join(failed),
        )
        return 1
    return 0
