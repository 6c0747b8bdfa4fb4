"""Run the benchmark suite (same as ``comol bench``); e.g. ``python benchmarks/run.py --quick``."""

import sys

from comol.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
