"""``comol bench``: the memory helper and the structure of what the entry point writes (not timings)."""

from __future__ import annotations

import json

import pytest
import torch

from comol.bench.memory import saved_tensor_bytes
from comol.cli import main


def test_saved_tensor_bytes_counts_unique_storages_and_excludes_params() -> None:
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    with saved_tensor_bytes(exclude=lin.parameters()) as saved:
        y = lin(x)  # saves x (weight grad) and the weight (input grad, excluded)
        z = y * y  # saves y twice: one storage
    assert saved.bytes == 5 * 8 * 4 + 5 * 4 * 4
    assert saved.count >= 3
    del z


def test_saved_tensor_bytes_no_grad_saves_nothing() -> None:
    with torch.no_grad(), saved_tensor_bytes() as saved:
        torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert saved.bytes == 0


def test_bench_entry_point_writes_json_and_markdown(tmp_path) -> None:
    md = tmp_path / "BENCH.md"
    argv = ["bench", "--quick", "--shapes", "32x16", "--tokens", "8", "--ranks", "4", "--experts", "2", "8",
            "--kernel-tokens", "16", "--repeats", "1", "--warmup", "0", "--no-model", "--threads", "1",
            "--out-dir", str(tmp_path), "--markdown", str(md)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"command", "config", "environment", "kernels", "layers", "models", "targets"} <= set(result)
    assert result["command"].startswith("comol bench")
    variants = {row["variant"] for row in result["layers"]}
    assert {"base", "lora", "comol", "comol (eager)", "comol w/o CR", "comol stacked"} <= variants
    for row in result["layers"]:  # the suite records a crashing variant as an error row: none may crash
        assert "error" not in row, row
        assert {"median_s", "saved_bytes", "trainable_params"} <= set(row)
    assert {row["impl"] for row in result["kernels"]} >= {"eager", "fused", "stacked"}
    assert any(t["target"].startswith("CoMoL E=8 / LoRA") for t in result["targets"])
    text = md.read_text()
    for heading in (
        "# Benchmarks",
        "## Targets",
        "## Layer level",
        "## Routing + core mixing alone",
        "## Plots",
    ):
        assert heading in text
    assert (tmp_path / "layer_median_vs_experts.png").exists()


def test_model_level_targets_compare_each_variant_with_lora_of_the_same_model() -> None:
    from comol.bench.report import targets

    def train(variant: str, seconds: float, saved: int, kind: str = "train") -> dict:
        return {"model": "m", "variant": variant, "kind": kind, "batch": 4, "seq": 8, "r": 16,
                "median_s": seconds, "saved_bytes": saved, "flops": 100 * seconds, "aten_s": seconds / 2}  # fmt: skip

    def decode(variant: str, batch: int, seconds: float, kind: str = "decode") -> dict:
        row = {"model": "m", "variant": variant, "kind": kind, "batch": batch, "per_token_s": seconds}
        if kind == "decode":  # as the bench writes them: compiled decoding rows carry no profiler figures
            row["aten_s_per_token"] = 1.0 if variant == "lora" else 1.01
        return row

    models = [train("lora", 1.0, 1000), train("comol E=8", 1.02, 1011), train("comol E=64", 1.06, 1000),
              train("comol w/o CR E=8", 1.07, 1000), decode("lora", 1, 1.0), decode("comol E=8", 1, 1.04),
              decode("lora", 8, 1.0), decode("comol E=8", 8, 1.2), train("lora", 2.0, 0, "train-compiled"),
              train("comol E=8", 2.1, 0, "train-compiled"), decode("lora", 1, 2.0, "decode-compiled"),
              decode("comol E=8", 1, 2.2, "decode-compiled")]  # fmt: skip
    result = {"layers": [], "kernels": [], "models": models, "environment": {"device_type": "cpu"}}
    met = {t["target"]: (round(t["value"], 4), t["met"]) for t in targets(result)}
    assert met == {
        "comol E=8 / LoRA: training step": (1.02, True),
        "comol E=64 / LoRA: training step": (1.06, False),
        "comol w/o CR E=8 / LoRA: training step": (1.07, True),
        "comol E=8 / LoRA: saved for backward (training step)": (1.011, False),
        "comol E=8 / LoRA (unmerged): decode per token, batch 1": (1.04, True),
        "comol E=8 / LoRA (unmerged): decode per token, batch 8": (1.2, False),
        "comol E=8 / LoRA: compiled training step (torch.compile, fullgraph)": (1.05, False),
        "comol E=8 / LoRA: compiled decode per token (torch.compile, fullgraph, static cache), batch 1": (
            1.1,
            False,
        ),
    }
    flops = {t["target"]: t["work"] for t in targets(result) if t["work"] is not None}
    assert flops == pytest.approx({"comol E=8 / LoRA: training step": 1.02, "comol E=64 / LoRA: training step": 1.06,
                                   "comol w/o CR E=8 / LoRA: training step": 1.07})  # fmt: skip
    aten = {t["target"]: t["aten"] for t in targets(result) if t["aten"] is not None}
    assert aten == pytest.approx({"comol E=8 / LoRA: training step": 1.02, "comol E=64 / LoRA: training step": 1.06,
                                  "comol w/o CR E=8 / LoRA: training step": 1.07,
                                  "comol E=8 / LoRA (unmerged): decode per token, batch 1": 1.01,
                                  "comol E=8 / LoRA (unmerged): decode per token, batch 8": 1.01})  # fmt: skip


def test_model_level_training_counts_flops_saved_memory_and_parameters() -> None:
    """One tiny Llama per variant on the same weights: the FLOP count of a step orders base < LoRA < CoMoL
    (whose router and mixing add matmuls) < CoMoL E=64, and CoMoL saves what LoRA saves."""
    from comol.bench.config import BenchConfig
    from comol.bench.model_level import build_model_variants, time_training
    from comol.bench.variants import Variant
    from training.tiny import make_tiny_model

    cfg = BenchConfig(repeats=2, warmup=0)
    variants = [Variant("base (frozen)", None, uses_experts=False), Variant("lora", "lora", uses_experts=False),
                Variant("comol E=2", "comol", {"num_experts": 2}), Variant("comol E=64", "comol", {"num_experts": 64})]  # fmt: skip
    models, errors = build_model_variants(
        cfg, torch.device("cpu"), torch.float32, lambda: make_tiny_model(64), variants, r=4
    )
    assert not errors
    ids = torch.randint(0, 64, (2, 16))
    rows = time_training(cfg, torch.device("cpu"), models, ids)
    flops = {label: row["flops"] for label, row in rows.items()}
    assert 0 < flops["base (frozen)"] < flops["lora"] < flops["comol E=2"] < flops["comol E=64"]
    assert rows["comol E=2"]["saved_bytes"] == rows["lora"]["saved_bytes"]
    assert all(0 < row["aten_s"] < row["max_s"] * 10 for row in rows.values())  # host time inside ATen ops
    assert (
        rows["comol E=64"]["trainable_params"]
        > rows["comol E=2"]["trainable_params"]
        > rows["lora"]["trainable_params"]
    )


def test_decode_op_count_orders_base_lora_comol() -> None:
    """One cached decoding step: the adapters add ATen operations (LoRA a few per layer, CoMoL's router and
    mixing more), the count is the same on a second call, and it does not depend on the batch."""
    from comol.bench.config import BenchConfig
    from comol.bench.model_level import build_model_variants, count_decode_ops, decode_aten_seconds
    from comol.bench.variants import Variant
    from training.tiny import make_tiny_model

    variants = [Variant("base (frozen)", None, uses_experts=False), Variant("lora", "lora", uses_experts=False),
                Variant("comol E=2", "comol", {"num_experts": 2})]  # fmt: skip
    models, _ = build_model_variants(
        BenchConfig(), torch.device("cpu"), torch.float32, lambda: make_tiny_model(64), variants, r=4
    )
    ops = count_decode_ops(models, 64, batch=1, seed=0)
    assert 0 < ops["base (frozen)"] < ops["lora"] < ops["comol E=2"]
    assert count_decode_ops(models, 64, batch=1, seed=0) == ops
    assert count_decode_ops(models, 64, batch=3, seed=0) == ops
    aten = decode_aten_seconds(models, 64, batch=1, seed=0, steps=2)
    assert set(aten) == set(models) and all(0 < seconds < 1 for seconds in aten.values())


@pytest.mark.slow
def test_compiled_decoding_resets_its_static_cache_every_run() -> None:
    """The compiled decoding timer (inductor, ``fullgraph=True``, ``StaticCache`` sized for the prompt and the
    new tokens) runs LoRA and CoMoL over the warm-up and every timed round: each run resets the cache, else the
    second run would write past its end."""
    import math

    from comol.bench.config import BenchConfig
    from comol.bench.model_level import build_model_variants, time_compiled_decoding
    from comol.bench.variants import Variant
    from training.tiny import make_tiny_model

    cfg = BenchConfig(repeats=2, decode_tokens=3)
    variants = [
        Variant("lora", "lora", uses_experts=False),
        Variant("comol E=2", "comol", {"num_experts": 2}),
    ]
    models, errors = build_model_variants(
        cfg, torch.device("cpu"), torch.float32, lambda: make_tiny_model(64), variants, r=4
    )
    assert not errors
    torch._dynamo.reset()
    per_token = time_compiled_decoding(cfg, torch.device("cpu"), models, 64, batch=2)
    assert set(per_token) == set(models) and all(math.isfinite(s) and abs(s) < 5 for s in per_token.values())


def test_measured_ratio_shows_a_third_decimal_only_where_two_would_print_the_limit() -> None:
    from comol.bench.report import _fmt_measured

    assert _fmt_measured(1.054, 1.05) == "1.054x"  # not met, though "1.05x" would read as the limit
    assert _fmt_measured(1.046, 1.05) == "1.046x"
    assert _fmt_measured(1.05, 1.05) == "1.05x"
    assert _fmt_measured(1.2, 1.05) == "1.20x"
    assert _fmt_measured(None, 1.05) == "n/a"


def test_what_stands_in_the_way_is_read_off_the_measured_columns() -> None:
    from comol.bench.report import _obstacle

    assert _obstacle(1.02, 1.03, aten=1.5) == ""  # met: nothing in the way
    assert _obstacle(1.30, 1.05, aten=1.29, flops=1.28) == (
        "the operations themselves (1.29x the time inside ATen); the FLOP ratio (1.28x) is above the limit"
    )
    assert _obstacle(1.17, 1.03, aten=1.11, flops=1.034) == (
        "the operations themselves (1.11x the time inside ATen) and Python outside the operations; "
        "the FLOP ratio (1.034x) is above the limit"
    )
    assert _obstacle(1.10, 1.03, aten=1.00, flops=1.01) == "Python outside the operations (ATen time 1.00x)"
    assert (
        _obstacle(1.05, 1.03, aten=1.035, flops=1.02)
        == "the operations themselves (1.035x the time inside ATen)"
    )
    assert _obstacle(1.06, 1.05, aten=1.05, operations=1.39) == (
        "within 0.02 of the ATen-time ratio (1.05x), itself within the limit; 1.39x the operations"
    )
    assert _obstacle(1.09, 1.03, aten=None, flops=1.10) == (
        "the time split is not profiled: see the README's performance section; the FLOP ratio (1.10x) is above "
        "the limit"
    )


def test_targets_not_met_say_what_stands_in_the_way() -> None:
    from comol.bench.report import targets

    def train(variant: str, seconds: float, flops: float, aten: float) -> dict:
        return {"model": "m", "variant": variant, "kind": "train", "batch": 4, "seq": 8, "r": 16,
                "median_s": seconds, "saved_bytes": 10, "flops": flops, "aten_s": aten}  # fmt: skip

    models = [
        train("lora", 1.0, 100, 0.9),
        train("comol E=8", 1.02, 101, 0.9),
        train("comol E=64", 1.2, 110, 0.91),
    ]
    kernels = [{"impl": impl, "tokens": 64, "r": 4, "E": 8, "median_s": 1.0, "saved_bytes": saved}
               for impl, saved in (("fused", 10), ("stacked", 200))]  # fmt: skip
    result = {"layers": [], "kernels": kernels, "models": models, "environment": {"device_type": "cpu"}}
    why = {t["target"]: t["why"] for t in targets(result)}
    assert why["comol E=8 / LoRA: training step"] == ""
    assert why["comol E=64 / LoRA: training step"] == (
        "Python outside the operations (ATen time 1.01x); the FLOP ratio (1.10x) is above the limit"
    )
    assert why["stacked / CoMoL: time"] == (
        "memory traded for time: CoMoL recomputes the mixture in backward (0.05x stacked's memory kept)"
    )
    kernels[0]["saved_bytes"] = 300  # keeping more than stacked: nothing measured explains the time
    assert {t["target"]: t["why"] for t in targets(result)}["stacked / CoMoL: time"] == ""
