"""``comol compose`` and ``comol decompose``: a CoMoL adapter from trained LoRAs, and its experts as LoRAs.

``comol compose`` writes a CoMoL adapter directory (loadable with ``PeftModel.from_pretrained`` after
``import comol``) plus ``composition.json`` with the per-module, per-expert reconstruction errors, and prints
their summary. ``comol decompose`` writes ``expert_<e>/`` LoRA directories. Neither replaces an existing
non-empty output directory unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``comol compose`` and ``comol decompose``."""
    compose = subparsers.add_parser(
        "compose",
        help="build a CoMoL adapter from trained LoRAs (core-space composition)",
        description="Stack the LoRAs' A and scaled B per module, take orthonormal bases by thin SVD and write "
        "one CoMoL adapter whose expert e is LoRA e (exact at the default rank). Prints the relative "
        "reconstruction error of every expert; composition.json in --out lists them per module.",
    )
    _model_args(compose)
    compose.add_argument(
        "--loras", nargs="+", required=True, metavar="DIR", help="LoRA adapter dirs or hub ids"
    )
    compose.add_argument("--out", required=True, help="output adapter directory")
    compose.add_argument("--rank", type=int, help="rank R of the composed adapter (default: exact)")
    compose.add_argument(
        "--router-init", default="uniform", choices=("uniform", "arrow"), help="router initialisation"
    )
    compose.add_argument("--no-core-router", action="store_true", help="route on x instead of z = A x")
    compose.add_argument("--top", type=int, default=5, help="print the TOP modules with the largest errors")
    compose.set_defaults(func=run_compose)

    decompose = subparsers.add_parser(
        "decompose",
        help="write each expert of a mixture adapter as a standalone LoRA",
        description="Write expert e of a CoMoL (or other routed) adapter as the LoRA B M_e A in OUT/expert_<e>, "
        "exact at the adapter's rank, or truncated by SVD with --rank (its error is printed).",
    )
    _model_args(decompose)
    decompose.add_argument("--adapter", required=True, help="the mixture adapter directory")
    decompose.add_argument("--out", required=True, help="output directory (expert_<e>/ inside)")
    decompose.add_argument("--rank", type=int, help="rank of the LoRAs (default: the adapter's r, exact)")
    decompose.set_defaults(func=run_decompose)
    return compose


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: hub id or local directory")
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load")
    from comol.loading import dtype_names

    parser.add_argument("--dtype", default="fp32", choices=(*dtype_names(allow_auto=False), "float64"))
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"--out {out} exists and is not empty; choose another directory or pass --force.")


def _load_base(args: argparse.Namespace) -> Any:
    import torch

    from comol.loading import load_causal_lm

    dtype = torch.float64 if args.dtype == "float64" else args.dtype
    return load_causal_lm(args.model, gguf_file=args.gguf_file, dtype=dtype).eval()


def _fail(command: str, err: Exception, verbose: bool) -> int:
    if verbose:
        logger.exception("comol %s failed", command)
    print(f"comol {command}: error: {err}", file=sys.stderr)
    return 2


def run_compose(args: argparse.Namespace) -> int:
    from comol.composition import CompositionError, check_lora_config, compose_loras

    out = Path(args.out)
    verbose = bool(getattr(args, "verbose", False))
    try:
        _check_out(out, args.force)
        if args.rank is not None and args.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {args.rank}.")
        from peft import PeftConfig

        for source in args.loras:  # cheap checks before the model is loaded
            try:
                config = PeftConfig.from_pretrained(source)
            except (OSError, ValueError) as err:
                raise CompositionError(f"{source}: cannot read adapter_config.json ({err}).") from err
            check_lora_config(config, source)
        base = _load_base(args)
        model = compose_loras(
            base,
            args.loras,
            rank=args.rank,
            core_router=not args.no_core_router,
            router_init=args.router_init,
        )
    except (ValueError, OSError) as err:
        return _fail("compose", err, verbose)
    report = model.comol_composition
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    model.save_pretrained(str(tmp))
    (tmp / "composition.json").write_text(json.dumps(report.as_dict(), indent=2))
    _replace_dir(tmp, out)
    print(f"Wrote a CoMoL adapter (r={report.rank}, {len(report.sources)} experts) to {out}.")
    print("Relative reconstruction error ||dW_e - B M_e A||_F / ||dW_e||_F, largest and mean over modules:")
    for e, source in enumerate(report.sources):
        errs = [v[e] for v in report.errors.values()]
        print(f"  expert {e} ({source}): max {max(errs):.3g}, mean {sum(errs) / len(errs):.3g}")
    worst = sorted(report.errors.items(), key=lambda kv: -max(kv[1]))[: max(args.top, 0)]
    if worst and max(worst[0][1]) > 0:
        print("Modules with the largest errors:")
        for name, errs in worst:
            print(f"  {name} (R0={report.stack_ranks[name]}): " + ", ".join(f"{v:.3g}" for v in errs))
    return 0


def run_decompose(args: argparse.Namespace) -> int:
    from peft import PeftModel

    import comol  # noqa: F401  (registers comol's methods with peft)
    from comol.composition import decompose
    from comol.mixture import check_adapter_dir

    out = Path(args.out)
    verbose = bool(getattr(args, "verbose", False))
    try:
        _check_out(out, args.force)
        check_adapter_dir(args.adapter)  # a config, a known peft_type and that method's weights
        if args.rank is not None and args.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {args.rank}.")
        model = PeftModel.from_pretrained(_load_base(args), args.adapter)
        loras = decompose(model, rank=args.rank)
    except (ValueError, OSError) as err:
        return _fail("decompose", err, verbose)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    for e, lora in enumerate(loras):
        lora.save_pretrained(tmp / f"expert_{e}")
    _replace_dir(tmp, out)
    print(f"Wrote {len(loras)} LoRAs to {out}/expert_<e>:")
    for e, lora in enumerate(loras):
        worst = max(lora.errors.values())
        print(
            f"  expert_{e}: r={lora.config.r}, {len(lora.errors)} modules, largest relative error {worst:.3g}"
        )
    return 0


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place; an old ``out`` (allowed by --force) is removed only afterwards."""
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
        os.replace(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)
