"""Router pictures: what an adapter's routers do on some data (``comol inspect``).

:func:`collect_router_report` runs a model with a comol adapter over texts and gathers

- per router (a mixture layer, or a SparseMoA decoder block): :class:`comol.RouterStats`' expert load (mean
  gate ``(E,)``), mean gate entropy (nats) and mean number of active experts per token;
- for the first few texts, per token and router, the dominant expert (the largest gate) and its gate.

:func:`write_router_report` turns that into four files: ``router_load.png`` (heatmap, routers x experts),
``router_entropy.png`` (entropy and active experts per router), ``router_tokens.html`` (the dominant expert
of every token, one table per example) and ``router_report.json`` (all the numbers).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comol.data.prompts import render_prompt
from comol.errors import UserError
from comol.files import atomic_write_json, atomic_write_text
from comol.mixture.model import routers
from comol.mixture.stats import RouterStats

logger = logging.getLogger(__name__)

FILES: dict[str, str] = {
    "load": "router_load.png",
    "entropy": "router_entropy.png",
    "tokens": "router_tokens.html",
    "numbers": "router_report.json",
}


@dataclass
class RouterReport:
    """What :func:`collect_router_report` measured.

    Attributes:
        routers: ``RouterStats.summary()``: ``{router: {"load": [E], "entropy", "active", "tokens"}}``, in
            model order.
        examples: per example ``{"tokens": [str] (T), "dominant": {router: [int] (T)}, "gate": {router:
            [float] (T)}}``.
        texts: number of texts run.
    """

    routers: dict[str, dict[str, Any]]
    examples: list[dict[str, Any]] = field(default_factory=list)
    texts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "routers": self.routers, "examples": self.examples}


def record_text(record: Mapping[str, Any], template: str = "alpaca") -> str:
    """The text a record stands for: its ``text`` field, or its prompt (``instruction``, ``input``) + ``output``."""
    if "text" in record:
        return str(record["text"])
    return render_prompt(record, template) + str(record.get("output") or "")


def read_texts(path: str | Path, limit: int | None = None, template: str = "alpaca") -> list[str]:
    """Texts from a ``.json`` (a list of records) or ``.jsonl`` file; records as in :func:`record_text`.

    Raises:
        UserError: a missing or unreadable file, or a record with neither ``text`` nor ``instruction``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} does not exist (give a .json or .jsonl file of records).")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--data {path} is not valid JSON ({err}).") from err
    if not isinstance(records, list) or not records:
        raise UserError(f"--data {path} must hold a non-empty list of records.")
    records = records[:limit] if limit is not None else records
    texts = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping) or not ({"text", "instruction"} & set(record)):
            raise UserError(f"--data {path}: record {index} has neither a 'text' nor an 'instruction' field.")
        texts.append(record_text(record, template))
    return texts


@torch.no_grad()
def collect_router_report(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 512, examples: int = 3
) -> RouterReport:
    """Run ``model`` over ``texts`` one at a time and collect its routers' statistics.

    Args:
        model: a ``PeftModel`` with a comol adapter.
        tokenizer: its tokenizer.
        texts: the texts (each truncated to ``max_length`` tokens).
        max_length: tokens per text at most.
        examples: how many of the first texts get the per-token view.

    Raises:
        UserError: the model has no comol router (e.g. DenseLoRA, which has none).
    """
    named = routers(model)
    if not named:
        raise UserError("The adapter has no router to inspect (comol inspect needs a routed comol method).")
    model.eval()
    device = next(model.parameters()).device
    report_examples: list[dict[str, Any]] = []
    with RouterStats(model) as stats:
        for index, text in enumerate(texts):
            batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(device)
            if index >= examples:
                model(**batch)
                continue
            dominant: dict[str, list[int]] = {}
            gate: dict[str, list[float]] = {}
            handles = [
                router.register_gate_hook(_per_token_hook(name, dominant, gate))
                for name, router in named.items()
            ]
            try:
                model(**batch)
            finally:
                for handle in handles:
                    handle.remove()
            ids = batch["input_ids"][0].tolist()
            tokens = [tokenizer.decode([token]) for token in ids]
            for values in (*dominant.values(), *gate.values()):
                if len(values) == 1:  # instance-level routing: one decision for the whole text
                    values *= len(tokens)
            report_examples.append({"tokens": tokens, "dominant": dominant, "gate": gate})
        summary = stats.summary()
    if not summary:
        raise UserError(
            "No router made a routing decision on the data: this adapter's method has no router (e.g. DenseLoRA) "
            "or the texts are empty. comol inspect needs a routed method (comol, molora, ...)."
        )
    order = {name: i for i, name in enumerate(named)}
    ordered = dict(sorted(summary.items(), key=lambda item: (order.get(item[0].split("[")[0], 0), item[0])))
    return RouterReport(routers=ordered, examples=report_examples, texts=len(texts))


def _per_token_hook(name: str, dominant: dict[str, list[int]], gate: dict[str, list[float]]) -> Any:
    """A gate hook writing each token's dominant expert and its gate at router ``name``."""

    def hook(router: Any, adapter_name: str, probs: torch.Tensor, gates: torch.Tensor, mask: Any) -> None:
        # gates: (T, E) float32 for one text, or (1, E) for instance-level routing
        key = name if adapter_name == "default" else f"{name}[{adapter_name}]"
        top = gates.max(dim=-1)  # (T,)
        dominant[key] = top.indices.tolist()
        gate[key] = top.values.tolist()

    return hook


def write_router_report(
    report: RouterReport, out_dir: str | Path, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the four files of :data:`FILES` into ``out_dir``; returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in FILES.items()}
    names = list(report.routers)
    loads = [entry["load"] for entry in report.routers.values()]
    plot_load(names, loads, paths["load"])
    plot_entropy(
        names,
        [entry["entropy"] for entry in report.routers.values()],
        [entry["active"] for entry in report.routers.values()],
        paths["entropy"],
    )
    atomic_write_text(paths["tokens"], token_html(report.examples, names))
    atomic_write_json(paths["numbers"], {**(meta or {}), **report.as_dict()})
    return paths


def _short(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[i - 1 :])
    return name


def plot_load(names: Sequence[str], loads: Sequence[Sequence[float]], path: Path) -> None:
    """Heatmap of expert load: one row per router, one column per expert (blank where a router has fewer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(load) for load in loads)
    grid = np.full((len(loads), width), np.nan)
    for row, load in enumerate(loads):
        grid[row, : len(load)] = load
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * width + 3), max(3.0, 0.22 * len(names) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(width), [str(e) for e in range(width)])
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("Expert load (mean gate per token)")
    fig.colorbar(image, ax=ax, label="mean gate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_entropy(names: Sequence[str], entropy: Sequence[float], active: Sequence[float], path: Path) -> None:
    """Two panels over the routers: mean gate entropy (nats) and mean active experts per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(names)))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.25 * len(names) + 2), 5.5))
    top.plot(x, entropy, marker="o")
    top.set_ylabel("gate entropy (nats)")
    top.set_title("Gate entropy and active experts per router")
    bottom.plot(x, active, marker="o", color="tab:orange")
    bottom.set_ylabel("active experts / token")
    step = max(1, math.ceil(len(names) / 40))
    bottom.set_xticks(x[::step], [_short(n) for n in names][::step], rotation=90, fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def token_html(examples: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """An HTML page: per example, a table of routers x tokens whose cells show the dominant expert."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab20"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>comol inspect: dominant experts</title>",
        "<style>body{font-family:sans-serif} table{border-collapse:collapse;font-size:11px;margin-bottom:2em}"
        "td,th{border:1px solid #ddd;padding:1px 3px;text-align:center;white-space:pre} th.r{text-align:left}"
        "</style></head><body><h1>Dominant expert per token</h1>",
        "<p>Each cell is the expert with the largest gate for that token at that router; hover for the gate.</p>",
    ]
    for number, example in enumerate(examples):
        tokens = example["tokens"]
        header = "".join(f"<th>{html.escape(t)}</th>" for t in tokens)
        parts.append(f"<h2>Example {number}</h2><table><tr><th class='r'>router</th>{header}</tr>")
        for name in names:
            if name not in example["dominant"]:
                continue
            cells = []
            for expert, value in zip(example["dominant"][name], example["gate"][name], strict=True):
                color = to_hex(palette(expert % palette.N))
                cells.append(f"<td style='background:{color}' title='gate {value:.3f}'>{expert}</td>")
            parts.append(f"<tr><th class='r'>{html.escape(_short(name))}</th>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
