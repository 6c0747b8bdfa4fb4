"""``comol train CONFIG.yaml [key=value ...]``: fine-tune a causal LM with any comol method."""

from __future__ import annotations

import argparse
import logging
import textwrap

logger = logging.getLogger(__name__)


def _keys_help() -> str:
    from comol.training.config import describe

    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, kind, default, text in describe():
        lines.append(f"  {key} ({kind}, default {default})")
        lines.extend(textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _run_dir_help() -> str:
    from comol.training.config import RESUMABLE_KEYS

    text = (
        "A new run refuses a train.output_dir that already holds checkpoints, adapter/ or metrics.json: "
        "pass --resume to continue that run or --overwrite to replace it. --resume accepts only a complete "
        "checkpoint (a missing or damaged file is named) and the run's saved config; of the config only "
        f"{', '.join(RESUMABLE_KEYS)} may change, unless --allow-config-change is given (the changes are then "
        "recorded in run_info.json)."
    )
    return "run directories:\n" + "\n".join(
        textwrap.wrap(text, width=96, initial_indent="  ", subsequent_indent="  ")
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model with CoMoL or a baseline from a YAML config plus key=value overrides",
        description=(
            "Fine-tune a causal LM with an adapter method on LLM-Adapters data, on transformers' Trainer. "
            "Runs on one device or under `accelerate launch` (DDP, FSDP, DeepSpeed)."
        ),
        epilog=(
            "examples:\n"
            "  comol train configs/math14k/qwen3-8b/comol.yaml\n"
            "  comol train configs/math14k/qwen3-8b/comol.yaml train.max_steps=100 adapter.options.num_experts=4\n"
            "  comol train --resume configs/math14k/qwen3-8b/comol.yaml\n"
            "  comol train --resume runs/comol/config.yaml train.max_steps=2000   # continue a run for longer\n"
            "  comol train --resume-from runs/comol/checkpoint-400 runs/comol/config.yaml\n\n"
            + _run_dir_help()
            + "\n\n"
            + _keys_help()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML config file (optional if every key is overridden)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.learning_rate=1e-4"
    )
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir from its newest checkpoint",
    )
    resume.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    resume.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in train.output_dir (checkpoints, adapter, config, logs, metrics)",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes the run (the changes are recorded in run_info.json)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="resolve and check config and data, print, exit"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from comol.training.config import load_config
    from comol.training.run import prepare_data, train

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        config_path, overrides = None, [config_path, *overrides]
    try:
        config = load_config(config_path, overrides)
        config.validate_method()
        if args.dry_run:
            records = prepare_data(config)
            print(config.to_yaml(), end="")
            logger.info("%d training and %d validation records.", len(records.train), len(records.validation))
            return 0
        result = train(
            config,
            resume=args.resume_from or args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
    except ValueError as err:
        logger.error("%s", err)
        return 2
    logger.info("Done. Adapter: %s; metrics: %s", result.adapter_dir, result.output_dir / "metrics.json")
    return 0
