"""Turn a :func:`comol.bench.suite.run_suite` result into JSON, Markdown tables, plots and ``BENCHMARKS.md``.

Everything in ``BENCHMARKS.md`` comes from the result dictionary: the command, device, versions, tables,
the target checks (ratios taken within the run) and the plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MIB = 1024**2


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _fmt_measured(value: float | None, limit: float) -> str:
    """A target's measured ratio, with a third decimal where two would print the limit itself (1.054x against
    1.05x reads "1.05x, not met" otherwise)."""
    if value is not None and f"{value:.2f}" == f"{limit:.2f}" and value != limit:
        return f"{value:.3f}x"
    return _fmt_ratio(value)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if "error" not in row and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------
def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured ratio, the limit and whether it is met."""
    checks: list[dict[str, Any]] = []
    layers, kernels, models = result["layers"], result["kernels"], result.get("models", [])

    def add(
        name: str, where: str, value: float | None, limit: float, lower_is_better: bool = True,
        work: float | None = None, aten: float | None = None, why: str = "",
    ) -> None:  # fmt: skip
        met = None if value is None else (value <= limit if lower_is_better else value >= limit)
        checks.append({"target": name, "where": where, "value": value, "limit": limit,
                       "op": "<=" if lower_is_better else ">=", "met": met, "work": work, "aten": aten,
                       "why": "" if met or met is None else why})  # fmt: skip

    groups = sorted({(r["d_in"], r["d_out"], r["tokens"], r["r"]) for r in layers})
    for d_in, d_out, n, r in groups:
        where = f"{d_in}->{d_out}, N={n}, r={r}"
        key = {"d_in": d_in, "d_out": d_out, "tokens": n, "r": r}
        comol8, lora8 = _find(layers, variant="comol", E=8, **key), _find(layers, variant="lora", E=8, **key)
        if comol8 and lora8:
            add("CoMoL E=8 / LoRA: fwd+bwd time", where, _ratio(comol8["median_s"], lora8["median_s"]), 1.10)
            add(
                "CoMoL E=8 / LoRA: saved for backward",
                where,
                _ratio(comol8["saved_bytes"], lora8["saved_bytes"]),
                1.10,
            )
        comol64, lora64 = (
            _find(layers, variant="comol", E=64, **key),
            _find(layers, variant="lora", E=64, **key),
        )
        if comol64 and comol8 and lora64 and lora8:
            # E=8 and E=64 are timed in different groups: compare each to LoRA of its own group, so that a
            # change of machine load between the groups cancels out.
            add("CoMoL E=64 / E=8: time (each relative to LoRA in its group)", where,
                _ratio(_ratio(comol64["median_s"], lora64["median_s"]), _ratio(comol8["median_s"], lora8["median_s"])),
                1.20)  # fmt: skip
            add(
                "CoMoL E=64 / E=8: saved for backward",
                where,
                _ratio(comol64["saved_bytes"], comol8["saved_bytes"]),
                1.20,
            )
        stacked8 = _find(layers, variant="comol stacked", E=8, **key)
        if stacked8 and comol8:
            stacked_lora = _ratio(stacked8["median_s"], lora8["median_s"]) if lora8 else None
            comol_lora = _ratio(comol8["median_s"], lora8["median_s"]) if lora8 else None
            share = "" if stacked_lora is None or comol_lora is None else (
                f"the mixing is a small part of a whole layer: stacked and CoMoL take {stacked_lora:.2f}x and "
                f"{comol_lora:.2f}x LoRA's time")  # fmt: skip
            add("stacked / CoMoL E=8 (whole layer): time", where, _ratio(stacked8["median_s"], comol8["median_s"]),
                1.5, lower_is_better=False, why=share)  # fmt: skip
    for r in sorted({row["r"] for row in kernels}):
        for e in sorted({row["E"] for row in kernels}):
            best = _find(kernels, impl=_auto_impl(result), r=r, E=e)
            stacked = _find(kernels, impl="stacked", r=r, E=e)
            if best and stacked:
                where = f"routing+mixing only, N={best['tokens']}, r={r}, E={e}"
                add("stacked / CoMoL: time", where, _ratio(stacked["median_s"], best["median_s"]), 1.5, False,
                    why=_recompute_why(best, stacked))  # fmt: skip
                add(
                    "CoMoL / stacked: saved for backward",
                    where,
                    _ratio(best["saved_bytes"], stacked["saved_bytes"]),
                    0.5,
                )
    for model in sorted({row["model"] for row in models}):
        model_targets(models, model, add)
    return checks


NOISE = 0.02  # margin below which a difference between two ratios of the same run is not read as a cause


def _recompute_why(comol: dict[str, Any], stacked: dict[str, Any]) -> str:
    """Why ``stacked`` is not much slower than CoMoL, where CoMoL keeps less for backward: it recomputes the
    mixture in backward instead (empty where it keeps as much or more: nothing measured explains it)."""
    saved = _ratio(comol.get("saved_bytes"), stacked.get("saved_bytes"))
    if saved is None or saved >= 1:
        return ""
    return f"memory traded for time: CoMoL recomputes the mixture in backward ({saved:.2f}x stacked's memory kept)"


def _obstacle(value: float | None, limit: float, aten: float | None, flops: float | None = None,
              operations: float | None = None) -> str:  # fmt: skip
    """What stands in the way of a time ratio ``value`` above ``limit``, read off the measured columns: the
    operations themselves where their ATen-time ratio is above the limit; Python outside them where the measured
    ratio exceeds the ATen-time ratio by more than :data:`NOISE`; and, as a fact about any device, a FLOP ratio above
    the limit (the floor of a compute-bound one, whatever the CPU's time split)."""
    if value is None or value <= limit:
        return ""
    causes = []
    if aten is None:
        causes.append("the time split is not profiled: see the README's performance section")
    else:
        if aten > limit:
            causes.append(f"the operations themselves ({_fmt_measured(aten, limit)} the time inside ATen)")
        if value > aten + NOISE:
            causes.append(
                "Python outside the operations" + ("" if aten > limit else f" (ATen time {aten:.2f}x)")
            )
        if not causes:  # aten <= limit and value <= aten + NOISE: just above the limit
            causes.append(f"within {NOISE:.2f} of the ATen-time ratio ({aten:.2f}x), itself within the limit")
    why = " and ".join(causes)
    if flops is not None and flops > limit:
        why += f"; the FLOP ratio ({_fmt_measured(flops, limit)}) is above the limit"
    return why + (f"; {operations:.2f}x the operations" if operations is not None else "")


# The model-level limits: training step time (variant -> limit), against peft LoRA in the same run.
TRAIN_LIMITS = {"comol E=8": 1.03, "comol E=64": 1.05, "comol w/o CR E=8": 1.08}
DECODE_LIMIT = 1.05  # CoMoL E=8 / unmerged LoRA, per token, batch 1 and 8
SAVED_LIMIT = 1.01  # saved for backward: at most LoRA's + 1%
COMPILED_LIMIT = 1.03  # compiled CoMoL E=8 step / compiled LoRA step


def model_targets(models: list[dict[str, Any]], model: str, add: Any) -> None:
    """Add the model-level targets of ``model`` (training, saved memory, decoding, compiled step)."""
    lora = _find(models, model=model, variant="lora", kind="train")
    for label, limit in TRAIN_LIMITS.items():
        row = _find(models, model=model, variant=label, kind="train")
        if lora and row:
            where = f"{model}, batch {row['batch']} x {row['seq']}, r={row['r']}"
            value, flops = (
                _ratio(row["median_s"], lora["median_s"]),
                _ratio(row.get("flops"), lora.get("flops")),
            )
            aten = _ratio(row.get("aten_s"), lora.get("aten_s"))
            add(f"{label} / LoRA: training step", where, value, limit, work=flops, aten=aten,
                why=_obstacle(value, limit, aten, flops=flops))  # fmt: skip
    comol = _find(models, model=model, variant="comol E=8", kind="train")
    if lora and comol:
        add("comol E=8 / LoRA: saved for backward (training step)", model,
            _ratio(comol["saved_bytes"], lora["saved_bytes"]), SAVED_LIMIT)  # fmt: skip
    decodes = (("decode", "comol E=8 / LoRA (unmerged): decode per token"),
               ("decode-compiled", "comol E=8 / LoRA: compiled decode per token (torch.compile, fullgraph, static cache)"))  # fmt: skip
    for kind, title in decodes:
        for batch in (1, 8):
            lora_dec = _find(models, model=model, variant="lora", kind=kind, batch=batch)
            comol_dec = _find(models, model=model, variant="comol E=8", kind=kind, batch=batch)
            if lora_dec and comol_dec:  # compiled rows have no operation counts: their work and ATen are None
                value = _ratio(comol_dec["per_token_s"], lora_dec["per_token_s"])
                ops = _ratio(comol_dec.get("ops_per_token"), lora_dec.get("ops_per_token"))
                aten = _ratio(comol_dec.get("aten_s_per_token"), lora_dec.get("aten_s_per_token"))
                add(f"{title}, batch {batch}", model, value, DECODE_LIMIT, work=ops, aten=aten,
                    why=_obstacle(value, DECODE_LIMIT, aten, operations=ops))  # fmt: skip
    lora_c = _find(models, model=model, variant="lora", kind="train-compiled")
    comol_c = _find(models, model=model, variant="comol E=8", kind="train-compiled")
    if lora_c and comol_c:
        value = _ratio(comol_c["median_s"], lora_c["median_s"])
        add("comol E=8 / LoRA: compiled training step (torch.compile, fullgraph)", model, value, COMPILED_LIMIT,
            why=_obstacle(value, COMPILED_LIMIT, None))  # fmt: skip


def _auto_impl(result: dict[str, Any]) -> str:
    return (
        "triton"
        if result["environment"]["device_type"] == "cuda" and "triton" in result["environment"]
        else "fused"
    )


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------
def markdown(result: dict[str, Any], plots: list[str]) -> str:
    """The whole ``BENCHMARKS.md``."""
    env = result["environment"]
    device_kind = "GPU" if env["device_type"] == "cuda" else "CPU"
    out = [
        "# Benchmarks",
        "",
        f"*Generated by `comol bench`; do not edit by hand.* These are **{device_kind} figures** "
        f"({env['device_name']}, dtype {result['dtype']}, {env['threads']} torch threads).",
        "",
        "Reproduce with:",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        "Versions: "
        + ", ".join(
            f"{k} {env[k]}"
            for k in ("python", "torch", "peft", "transformers", "comol", "triton")
            if k in env
        )
        + ".",
        f"Platform: {env['platform']}.",
        "",
        "Times are medians over interleaved repeats (every case of a group runs once per round), so ratios"
        " within a table are taken under the same load. *Saved for backward* is the exact size of the"
        " distinct tensors autograd keeps between forward and backward (parameters excluded), counted with"
        " `torch.autograd.graph.saved_tensors_hooks`; on GPUs the peak of `torch.cuda.max_memory_allocated`"
        " is given as well.",
        "",
    ]
    for note in result.get("notes", []):
        out += [f"Note: {note}", ""]

    checks = targets(result)
    out += ["## Targets", "",
            "*Work* is the ratio of the work the two steps do, counted in the same run: for a training step the "
            "matmul and attention FLOPs (`torch.utils.flop_counter`, forward and backward), the time ratio a "
            "compute-bound device approaches; for a decoded token the ATen operations dispatched (each a kernel "
            "launch on a GPU), the time ratio where per-operation cost dominates, as at batch 1-8. A time "
            "target below its work ratio cannot be met by a faster implementation of the same operations. "
            "*ATen time* is the ratio of the host time spent inside ATen operations (`torch.profiler` self CPU "
            "times, the optimizer included for a training step): where it is below the measured ratio, the rest "
            "is Python (module calls, operation dispatch, autograd's engine); where it is at the measured ratio, "
            "the operations themselves cost that much. *What stands in the way* of a model-level time target not "
            "met is read off those columns: the operations themselves where their ATen time is above the limit, "
            f"Python outside them where the measured ratio exceeds the ATen time by more than {NOISE:.2f}, and a "
            "FLOP ratio above the limit (a compute-bound device's floor); for the stacked comparisons, what CoMoL "
            "trades or where the mixing's share of the layer is small.",
            "", _table(
        ["target", "where", "measured", "limit", "met", "work", "ATen time", "what stands in the way"],
        ([c["target"], c["where"], _fmt_measured(c["value"], c["limit"]), f"{c['op']} {c['limit']:.2f}x",
          "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**"),
          _fmt_ratio(c.get("work")) if c.get("work") is not None else "",
          _fmt_ratio(c.get("aten")) if c.get("aten") is not None else "", c.get("why", "")] for c in checks),
    ), ""]  # fmt: skip

    out += ["## Routing + core mixing alone", "",
            "Router logits, float32 softmax and core mixing, forward + backward, per implementation "
            "(`stacked` builds one merged `r x r` core per token, as the authors' code does).", ""]  # fmt: skip
    out.append(_table(
        ["impl", "N", "r", "E", "fwd+bwd ms", "saved MiB"],
        ([k["impl"], str(k["tokens"]), str(k["r"]), str(k["E"]), _ms(k["median_s"]), _mib(k["saved_bytes"])]
         for k in result["kernels"]),
    ))  # fmt: skip
    out += ["", "## Layer level", "",
            "One adapted projection `x -> W x + delta(x)` with `x` requiring grad (as inside a network); "
            "`lora_alpha = 2r`; ratios against peft LoRA in the same group.", ""]  # fmt: skip
    layer_rows = []
    for row in result["layers"]:
        if "error" in row:
            layer_rows.append([row["variant"], f"{row['d_in']}->{row['d_out']}", str(row["tokens"]), str(row["r"]),
                               str(row["E"]), "error", "", "", "", row["error"][:80]])  # fmt: skip
            continue
        lora = _find(result["layers"], variant="lora", d_in=row["d_in"], d_out=row["d_out"], tokens=row["tokens"],
                     r=row["r"], E=row["E"])  # fmt: skip
        layer_rows.append([
            row["variant"], f"{row['d_in']}->{row['d_out']}", str(row["tokens"]), str(row["r"]), str(row["E"]),
            _ms(row["median_s"]), _fmt_ratio(_ratio(row["median_s"], lora and lora["median_s"])),
            _mib(row["saved_bytes"]), _fmt_ratio(_ratio(row["saved_bytes"], lora and lora["saved_bytes"])),
            _mib(row["peak_bytes"]),
        ])  # fmt: skip
    out.append(_table(
        ["variant", "shape", "N", "r", "E", "fwd+bwd ms", "time / LoRA", "saved MiB", "saved / LoRA", "peak MiB"],
        layer_rows,
    ))  # fmt: skip
    models = result.get("models", [])
    if models:
        out += ["", "## Model level", "", "Training step (forward, backward, fused AdamW, the optimiser transformers' "
                "Trainer uses by default) and greedy decoding with the KV cache; decode time per token = (time for "
                "n new tokens - time for 1) / (n - 1). *ATen ms / token* is the host time spent inside ATen operations "
                "in one cached decoding step (the sum of their self CPU times under `torch.profiler`); the rest of the "
                "step's time is Python: module calls and the binding of each operation. *(compiled)*: the step, or the "
                "transformers model's forward for decoding (on a static KV cache, one token per step), compiled by "
                "`torch.compile(fullgraph=True)`; its ratio is to LoRA compiled alike.", ""]  # fmt: skip
        train = [m for m in models if m["kind"] in ("train", "train-compiled")]
        out.append(_table(
            ["model", "variant", "batch x seq", "step ms", "ATen ms", "tokens/s", "GFLOP", "saved MiB", "peak MiB",
             "trainable"],
            ([m["model"], m["variant"] + (" (compiled)" if m["kind"] == "train-compiled" else ""),
              f"{m['batch']}x{m['seq']}", _ms(m["median_s"]), _ms(m.get("aten_s")), f"{m['tokens_per_s']:.0f}",
              f"{m['flops'] / 1e9:.1f}" if m.get("flops") is not None else "n/a",
              _mib(m["saved_bytes"]), _mib(m["peak_bytes"]), f"{m['trainable_params']:,}"] for m in train),
        ))  # fmt: skip
        out.append("")
        decode = [m for m in models if m["kind"] in ("decode", "decode-compiled")]
        out.append(_table(
            ["model", "variant", "batch", "ms / token", "/ LoRA", "ATen ops / token", "ATen ms / token"],
            ([m["model"], m["variant"] + (" (compiled)" if m["kind"] == "decode-compiled" else ""), str(m["batch"]),
              _ms(m["per_token_s"]),
              _fmt_ratio(_ratio(m["per_token_s"], (_find(models, model=m["model"], variant="lora", kind=m["kind"],
                                                         batch=m["batch"]) or {}).get("per_token_s"))),
              str(m.get("ops_per_token", "n/a")),
              _ms(m.get("aten_s_per_token"))]
             for m in decode),
        ))  # fmt: skip
        errors = [m for m in models if m["kind"] == "error"]
        if errors:
            out += ["", *(f"- {m['model']} / {m['variant']}: {m['error']}" for m in errors)]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Layer time and saved memory against E, one line per variant (first shape, tokens and rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row for row in result["layers"] if "error" not in row]
    if not layers:
        return []
    first = layers[0]
    key = {"d_in": first["d_in"], "d_out": first["d_out"], "tokens": first["tokens"], "r": first["r"]}
    rows = [row for row in layers if all(row[k] == v for k, v in key.items())]
    paths = []
    for metric, label, scale in (
        ("median_s", "forward+backward (ms)", 1e3),
        ("saved_bytes", "saved for backward (MiB)", 1 / MIB),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(row["variant"] for row in rows):
            points = sorted((row["E"], row[metric] * scale) for row in rows if row["variant"] == variant)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E")
        ax.set_ylabel(label)
        ax.set_title(
            f"{key['d_in']}->{key['d_out']}, N={key['tokens']}, r={key['r']} ({result['environment']['device_type']})"
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"layer_{metric.removesuffix('_s').removesuffix('_bytes')}_vs_experts.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(
    result: dict[str, Any], out_dir: str | os.PathLike, markdown_path: str | os.PathLike | None
) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and the plots into ``out_dir``; copy the Markdown to ``markdown_path``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "targets": targets(result)}
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plots = plot(result, out)
    written = {"json": json_path}
    md_here = out / "bench.md"
    md_here.write_text(markdown(result, [p.name for p in plots]))
    written["markdown"] = md_here
    if markdown_path is not None:
        md_path = Path(markdown_path)
        rel = [os.path.relpath(p, md_path.parent.resolve()) for p in (q.resolve() for q in plots)]
        md_path.write_text(markdown(result, rel))
        written["benchmarks_md"] = md_path
    for i, p in enumerate(plots):
        written[f"plot{i}"] = p
    return written
