"""``comol bench``: measure CoMoL against the base layer, peft LoRA and the other mixture methods."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

logger = logging.getLogger(__name__)


def _shape(text: str) -> tuple[int, int]:
    d_in, _, d_out = text.partition("x")
    return int(d_in), int(d_out)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark kernels, layers and models; writes JSON, Markdown, plots and BENCHMARKS.md",
        description="Kernel-, layer- and model-level benchmarks measured in one run, on the same inputs. "
        "Without --quick the full grid (Qwen3-8B shapes, 2k-16k tokens) runs: meant for a GPU.",
    )
    parser.add_argument("--quick", action="store_true", help="small grid that finishes in minutes on a CPU")
    parser.add_argument("--shapes", nargs="+", type=_shape, help="layer shapes D_INxD_OUT, e.g. 4096x1024")
    parser.add_argument("--tokens", nargs="+", type=int, help="tokens N per layer step")
    parser.add_argument("--ranks", nargs="+", type=int, help="LoRA ranks r")
    parser.add_argument("--experts", nargs="+", type=int, help="numbers of experts E")
    parser.add_argument("--kernel-tokens", type=int, help="tokens for the routing+mixing comparison")
    parser.add_argument("--repeats", type=int, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--no-model", action="store_true", help="skip the model-level benchmarks")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile training step and decoding (tiny model)",
    )
    parser.add_argument("--train-batch", type=int)
    parser.add_argument("--train-seq", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--decode-batches", nargs="+", type=int)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, ..."
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out-dir", default="benchmarks/results", help="where bench.json, bench.md, plots go"
    )
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="Markdown report path ('' to skip)")
    parser.add_argument("--from-json", help="only re-render the reports from an earlier bench.json")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from comol.bench.report import write_outputs
    from comol.bench.suite import BenchConfig, run_suite

    if args.from_json:
        import json
        from pathlib import Path

        result = json.loads(Path(args.from_json).read_text())
        result.pop("targets", None)
        write_outputs(result, args.out_dir, args.markdown or None)
        return 0

    overrides = {
        "shapes": args.shapes,
        "tokens": args.tokens,
        "ranks": args.ranks,
        "experts": args.experts,
        "kernel_tokens": args.kernel_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "train_batch": args.train_batch,
        "train_seq": args.train_seq,
        "decode_tokens": args.decode_tokens,
        "decode_batches": args.decode_batches,
        "threads": args.threads,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(
        device=args.device,
        dtype=args.dtype,
        model_level=not args.no_model,
        smollm2=not args.no_smollm2,
        compiled_step=not args.no_compile,
    )
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    command = "comol " + shlex.join(sys.argv[sys.argv.index("bench") :] if "bench" in sys.argv else ["bench"])
    result = run_suite(cfg, command=command)
    written = write_outputs(result, args.out_dir, args.markdown or None)
    for kind, path in written.items():
        logger.info("wrote %s: %s", kind, path)
    return 0
