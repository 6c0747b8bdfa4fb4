"""The accuracy figures of the CoMoL paper's Tables 2-4 (arXiv 2603.00573), kept as facts for ``--compare paper``.

Transcribed from the paper's text (arXiv 2603.00573); each cell is the
printed figure in percent (mean, std over three seeds for Tables 2-3; a single figure for Table 4), "Param"
in millions. Tables 2-3 have no DenseLoRA row and Table 4 no SparseMoA row; the paper has no SMEAR row.
The parameter-count facts with the settings that reproduce them live in :mod:`comol.params.paper`.
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_DATASETS: tuple[str, ...] = ("AddSub", "AQuA", "GSM8K", "MultiArith", "SingleEq", "SVAMP")
CODE_METRICS: tuple[str, ...] = ("pass@1", "pass@5", "pass@10")

# The paper's row label of each comol configuration label used by the sweep study (a config's file stem).
PAPER_LABELS: dict[str, str] = {
    "lora": "LoRA",
    "molora": "MoLoRA",
    "hydralora": "HydraLoRA",
    "mola": "MoLA",
    "adamole": "AdaMoLE",
    "sparsemoa": "SparseMoA",
    "flylora": "FlyLoRA",
    "denselora": "DenseLoRA",
    "comol-wo-cr": "CoMoL w/o CR",
    "comol-no-cr": "CoMoL w/o CR",  # configs/*/comol-no-cr.yaml
    "comol": "CoMoL",
}


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's results tables.

    Attributes:
        name: e.g. ``"Table 2"``.
        title: model and task.
        columns: metric column names (datasets, then ``Average``; or pass@k).
        rows: ``{paper label: ([(mean, std | None) per column], param_m)}``.
    """

    name: str
    title: str
    columns: tuple[str, ...]
    rows: dict[str, tuple[tuple[tuple[float, float | None], ...], float]]


def _math(name: str, title: str, rows: tuple) -> PaperTable:
    return PaperTable(
        name, title, (*MATH_DATASETS, "Average"), {label: (cells, p) for label, cells, p in rows}
    )


def _code(name: str, title: str, rows: tuple, second: bool) -> PaperTable:
    out = {}
    for label, first_k, first_p, second_k, second_p in rows:
        cells, param = (second_k, second_p) if second else (first_k, first_p)
        out["HydraLoRA" if label == "HydraLora" else label] = (tuple((v, None) for v in cells), param)
    return PaperTable(name, title, CODE_METRICS, out)


_TABLE2 = (
    (
        "LoRA",
        (
            (93.67, 0.39),
            (37.40, 2.58),
            (81.80, 0.67),
            (98.17, 0.86),
            (96.85, 0.23),
            (88.80, 0.53),
            (82.78, 0.47),
        ),
        24.77,
    ),
    (
        "MoLoRA",
        (
            (93.76, 1.30),
            (42.26, 2.41),
            (82.51, 2.35),
            (98.11, 0.38),
            (96.06, 1.04),
            (90.40, 0.30),
            (83.85, 1.17),
        ),
        107.35,
    ),
    (
        "HydraLoRA",
        (
            (93.16, 1.27),
            (39.11, 2.79),
            (81.78, 1.48),
            (98.11, 0.25),
            (95.21, 0.75),
            (88.80, 0.26),
            (82.70, 0.88),
        ),
        49.55,
    ),
    (
        "MoLA",
        (
            (93.33, 0.89),
            (42.78, 0.45),
            (81.50, 1.14),
            (98.33, 0.44),
            (96.13, 0.50),
            (89.83, 1.16),
            (83.65, 0.26),
        ),
        107.35,
    ),
    (
        "AdaMoLE",
        (
            (92.24, 1.05),
            (41.73, 4.26),
            (81.65, 1.00),
            (98.22, 0.25),
            (96.19, 0.80),
            (89.10, 0.75),
            (83.19, 0.85),
        ),
        108.38,
    ),
    (
        "SparseMoA",
        (
            (93.33, 0.15),
            (40.68, 2.95),
            (83.85, 0.35),
            (98.17, 0.44),
            (97.31, 0.11),
            (88.80, 1.66),
            (83.69, 0.76),
        ),
        24.49,
    ),
    (
        "FlyLoRA",
        (
            (93.00, 0.81),
            (39.11, 1.98),
            (86.20, 0.50),
            (98.44, 0.10),
            (95.87, 0.86),
            (89.23, 0.70),
            (83.64, 0.40),
        ),
        24.77,
    ),
    (
        "CoMoL w/o CR",
        (
            (93.92, 2.42),
            (44.09, 1.80),
            (83.67, 2.51),
            (98.28, 0.19),
            (97.31, 0.69),
            (89.53, 0.80),
            (84.47, 1.25),
        ),
        33.39,
    ),
    (
        "CoMoL",
        (
            (94.60, 1.05),
            (44.62, 5.32),
            (83.93, 1.64),
            (98.22, 0.69),
            (96.46, 0.86),
            (89.03, 0.55),
            (84.48, 1.40),
        ),
        25.16,
    ),
)
_TABLE3 = (
    (
        "LoRA",
        (
            (96.20, 0.25),
            (41.34, 3.39),
            (87.49, 0.86),
            (97.83, 0.29),
            (97.64, 0.41),
            (90.60, 0.56),
            (85.18, 0.86),
        ),
        35.39,
    ),
    (
        "MoLoRA",
        (
            (96.37, 0.29),
            (44.88, 2.73),
            (87.59, 1.12),
            (98.33, 0.29),
            (97.90, 0.45),
            (91.50, 0.69),
            (86.10, 0.72),
        ),
        76.84,
    ),
    (
        "HydraLoRA",
        (
            (95.78, 1.39),
            (43.70, 2.39),
            (88.05, 1.20),
            (98.17, 1.04),
            (97.77, 0.41),
            (91.37, 0.81),
            (85.81, 0.34),
        ),
        40.47,
    ),
    (
        "MoLA",
        (
            (96.96, 0.67),
            (42.26, 4.55),
            (88.98, 0.68),
            (98.67, 0.17),
            (97.83, 0.52),
            (91.63, 0.57),
            (86.06, 0.66),
        ),
        153.68,
    ),
    (
        "AdaMoLE",
        (
            (96.20, 0.25),
            (40.55, 4.54),
            (88.02, 1.26),
            (98.50, 0.17),
            (98.10, 0.23),
            (91.13, 0.70),
            (85.42, 0.54),
        ),
        78.36,
    ),
    (
        "SparseMoA",
        (
            (96.29, 0.89),
            (44.62, 3.44),
            (88.20, 1.02),
            (98.11, 0.35),
            (98.10, 0.11),
            (91.63, 0.99),
            (86.16, 0.77),
        ),
        34.50,
    ),
    (
        "FlyLoRA",
        (
            (95.27, 0.15),
            (41.86, 2.24),
            (88.53, 0.52),
            (98.11, 0.35),
            (96.72, 0.50),
            (91.47, 0.15),
            (85.33, 0.40),
        ),
        35.39,
    ),
    (
        "CoMoL w/o CR",
        (
            (96.03, 0.96),
            (45.28, 4.47),
            (87.72, 2.46),
            (98.11, 0.67),
            (97.83, 0.20),
            (91.50, 0.96),
            (86.08, 1.23),
        ),
        47.90,
    ),
    (
        "CoMoL",
        (
            (96.62, 0.53),
            (46.06, 4.09),
            (87.89, 0.38),
            (98.11, 0.35),
            (97.44, 0.68),
            (91.93, 0.91),
            (86.34, 1.01),
        ),
        35.82,
    ),
)
# (label, Llama3.1-8B pass@1/5/10, its Param, Qwen3-8B pass@1/5/10, its Param)
_TABLE4 = (
    ("LoRA", (26.22, 54.41, 67.07), 23.06, (39.69, 72.29, 81.71), 24.77),
    ("MoLoRA", (34.15, 63.15, 72.56), 100.14, (43.78, 73.49, 82.93), 107.35),
    ("HydraLora", (33.35, 60.96, 69.51), 45.09, (46.89, 75.61, 84.15), 49.55),
    ("MoLA", (28.72, 56.53, 67.68), 100.14, (41.10, 71.60, 81.10), 107.35),
    ("AdaMoLE", (21.52, 44.58, 56.10), 101.12, (40.91, 66.65, 76.83), 108.38),
    ("DenseLoRA", (31.58, 58.71, 67.07), 26.74, (46.82, 76.04, 84.75), 27.00),
    ("FlyLoRA", (32.32, 63.21, 71.95), 23.06, (20.18, 38.15, 48.17), 24.77),
    ("CoMoL w/o CR", (31.10, 59.42, 68.90), 27.16, (43.23, 77.25, 87.19), 33.40),
    ("CoMoL", (35.00, 63.65, 73.17), 23.24, (48.11, 77.22, 86.59), 24.97),
)

PAPER_TABLES: dict[str, PaperTable] = {
    "table2": _math("Table 2", "Qwen3-8B, math reasoning, accuracy (%)", _TABLE2),
    "table3": _math("Table 3", "Qwen3-14B, math reasoning, accuracy (%)", _TABLE3),
    "table4-llama": _code("Table 4", "Llama3.1-8B, HumanEval pass@k (%)", _TABLE4, second=False),
    "table4-qwen": _code("Table 4", "Qwen3-8B, HumanEval pass@k (%)", _TABLE4, second=True),
}
