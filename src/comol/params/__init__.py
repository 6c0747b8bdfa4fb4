"""Trainable-parameter counts of every method, measured on the real adapter without loading any weight.

- :mod:`~comol.params.counting`: the engine (meta-device base models, presets, :func:`count_params`).
- :mod:`~comol.params.paper`: the paper's "Param" figures of Tables 2-5 (:data:`PAPER_ROWS`), kept as facts.
- :mod:`~comol.params.table`: the rows counted and rendered as the Markdown table of ``README.md``.

The command line is ``comol params`` (:mod:`comol.cli.params`); ``comol params --paper-table --output
README.md`` rewrites the README's table and ``tests/test_params.py`` checks every row.
"""

from comol.params.counting import (
    PAPER_TARGETS,
    PRESETS,
    ParamCount,
    adapted,
    build_meta_model,
    count_on,
    count_params,
    count_params_by_depth,
    load_model_config,
    method_config,
    parse_options,
)
from comol.params.paper import PAPER_ROWS, TOLERANCE_M, PaperRow
from comol.params.table import (
    MARKERS,
    check_paper_table_file,
    paper_table,
    paper_table_markdown,
    write_paper_table,
)

__all__ = [
    "MARKERS",
    "PAPER_ROWS",
    "PAPER_TARGETS",
    "PRESETS",
    "TOLERANCE_M",
    "PaperRow",
    "ParamCount",
    "adapted",
    "build_meta_model",
    "check_paper_table_file",
    "count_on",
    "count_params",
    "count_params_by_depth",
    "load_model_config",
    "method_config",
    "paper_table",
    "paper_table_markdown",
    "parse_options",
    "write_paper_table",
]
