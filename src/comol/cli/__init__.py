"""The ``comol`` command line: one sub-command per module in this package.

Each sub-command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``parser.set_defaults(func=...)`` where ``func(args) -> int`` is the exit code. Sub-command modules keep
heavy imports (torch, transformers) inside ``func`` so that ``comol --help`` stays instant.

Errors: bad input raises :class:`comol.errors.UserError` (anywhere, library code included); :func:`main`
prints its one-line message and returns 2, with the traceback only under ``--verbose`` (accepted before
or after the sub-command). A sub-command that forwards unknown options to another tool sets
``parser.set_defaults(extra_args=True)`` and receives them as ``args.extra_args``; elsewhere an unknown
option is an error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from comol.errors import UserError

# Order is the order shown by ``comol --help``.
SUBCOMMANDS: tuple[str, ...] = (
    "demo",
    "train",
    "eval",
    "inspect",
    "params",
    "bench",
    "compose",
    "sweep",
)  # compose: + decompose


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
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command (at any depth) a ``--verbose`` flag that does not reset the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--verbose" not in sub._option_string_actions:
                    sub.add_argument(
                        "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
                    )
                _add_verbose(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "extra_args", None) is True:
        args.extra_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.verbose:
            logging.getLogger("comol").exception("bad input")
        sys.stderr.write(f"comol: error: {err}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
