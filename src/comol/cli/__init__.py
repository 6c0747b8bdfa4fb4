"""The ``comol`` command line: one sub-command per module in this package.

Each sub-command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``parser.set_defaults(func=...)`` where ``func(args) -> int`` is the exit code. Sub-command modules keep
heavy imports (torch, transformers) inside ``func`` so that ``comol --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order is the order shown by ``comol --help``.
SUBCOMMANDS: tuple[str, ...] = ("demo", "train", "eval", "params", "bench", "compose")  # compose: + decompose


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comol",
        description="CoMoL: Core-Space Mixture of LoRA, and the mixture-of-LoRA baselines it is compared with.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"comol.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"comol.cli.{name}":  # sub-command not shipped in this build
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
