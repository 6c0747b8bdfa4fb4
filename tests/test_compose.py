"""Core-space composition of LoRAs into CoMoL (comol.compose_loras) and its reverse (comol.decompose).

References are dense float64 formulas written from the construction: ``dW_e = s_e B_e A_e`` of every LoRA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import comol
from comol.cli import main
from comol.composition import CompositionError, truncate_lora
from comol.mixture.model import mixture_layers

from conftest import randomize_adapter, tiny_model

F64 = torch.float64
# Three LoRAs that differ in rank, alpha, rsLoRA and target modules (only LoRA 0 adapts o_proj and down_proj,
# LoRA 2 has a per-module rank and alpha).
LORA_SPECS = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj"]),
    dict(
        r=6,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 3},
        alpha_pattern={"up_proj": 12},
    ),
)


def make_lora(path: Path, seed: int, std: float = 0.3, **kwargs) -> Path:
    """Save a LoRA with random A and B (not zero) on the tiny float64 Llama."""
    model = get_peft_model(tiny_model(dtype=F64), LoraConfig(**kwargs))
    randomize_adapter(model, seed=seed, std=std)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [make_lora(root / f"lora{e}", seed=e + 1, **spec) for e, spec in enumerate(LORA_SPECS)]


def lora_logits(lora_dir: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    base = tiny_model(dtype=F64)
    model = base if lora_dir is None else PeftModel.from_pretrained(base, str(lora_dir))
    with torch.no_grad():
        return model(input_ids).logits


def dense_updates(lora_dir: Path) -> dict[str, torch.Tensor]:
    """``{module: s B A (d_out, d_in)}`` of a LoRA, read through peft's own layers (its scaling)."""
    model = PeftModel.from_pretrained(tiny_model(dtype=F64), str(lora_dir))
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[name] = (module.scaling["default"] * b @ a).detach()
    return out


def composed_updates(model: PeftModel) -> dict[str, torch.Tensor]:
    """``{module: (E, d_out, d_in)}`` of the composed adapter: ``scaling * B M_e A``."""
    out = {}
    for name, layer in mixture_layers(model).items():
        a = layer.comol_A["default"].weight
        b = layer.comol_B["default"].weight
        cores = layer.comol_cores["default"]
        dw = torch.einsum("or,ers,si->eoi", b, cores, a) * layer.scaling["default"]
        out[name.removeprefix("base_model.model.")] = dw.detach()
    return out


def test_exact_rank_reproduces_every_lora_update(lora_dirs: list[Path]) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    composed = composed_updates(model)
    for e, lora_dir in enumerate(lora_dirs):
        reference = dense_updates(lora_dir)
        for name, dw in composed.items():
            expected = reference.get(name, torch.zeros_like(dw[e]))
            torch.testing.assert_close(dw[e], expected, rtol=0, atol=1e-12)
    report = model.comol_composition
    assert report.rank == 4 + 2 + 6  # q_proj: every LoRA adapts it, R0 = 12
    assert max(report.max_errors()) < 1e-12
    assert report.stack_ranks["model.layers.0.self_attn.k_proj"] == 2


def test_one_hot_export_reproduces_each_lora(
    lora_dirs: list[Path], input_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    for e, lora_dir in enumerate(lora_dirs):
        gates = torch.zeros(len(lora_dirs))
        gates[e] = 1.0
        comol.export_lora(model, tmp_path / f"expert{e}", gates=gates)
        torch.testing.assert_close(
            lora_logits(tmp_path / f"expert{e}", input_ids),
            lora_logits(lora_dir, input_ids),
            rtol=0,
            atol=1e-10,
        )


def test_uniform_router_is_the_mean_update(lora_dirs: list[Path], input_ids: torch.Tensor) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    reference = tiny_model(dtype=F64)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for lora_dir in lora_dirs:
            for name, dw in dense_updates(lora_dir).items():
                modules[name].weight += dw / len(lora_dirs)
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-10)


def test_loaded_peft_models_compose_like_directories(lora_dirs: list[Path]) -> None:
    loaded = [PeftModel.from_pretrained(tiny_model(dtype=F64), str(d)) for d in lora_dirs]
    from_models = composed_updates(comol.compose_loras(tiny_model(dtype=F64), loaded))
    from_dirs = composed_updates(comol.compose_loras(tiny_model(dtype=F64), lora_dirs))
    for name, dw in from_dirs.items():
        torch.testing.assert_close(from_models[name], dw, rtol=0, atol=1e-12)


def test_truncation_error_matches_the_dense_error(lora_dirs: list[Path]) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs, rank=5)
    composed = composed_updates(model)
    errors = model.comol_composition.errors
    truncated_somewhere = False
    for e, lora_dir in enumerate(lora_dirs):
        for name, dw in dense_updates(lora_dir).items():
            expected = (
                torch.linalg.matrix_norm(dw - composed[name][e]) / torch.linalg.matrix_norm(dw)
            ).item()
            assert errors[name][e] == pytest.approx(expected, rel=1e-9, abs=1e-12)
            truncated_somewhere |= expected > 1e-3
    assert truncated_somewhere


def test_truncation_error_is_what_the_discarded_singular_values_predict(tmp_path: Path) -> None:
    # One LoRA whose stacks are aligned: A = diag(a) V^T, B = U diag(b), so dW = U diag(s a b) V^T and the
    # kept directions of A and B are the top singular directions of dW: the error is Eckart-Young's.
    lora_dir = make_lora(tmp_path / "aligned", seed=0, r=6, lora_alpha=12, target_modules=["q_proj"])
    weights = load_file(str(lora_dir / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    a_sv = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64)
    b_sv = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5], dtype=F64)
    for key in weights:
        v, _ = torch.linalg.qr(torch.randn(32, 6, generator=gen, dtype=F64))
        u, _ = torch.linalg.qr(torch.randn(32, 6, generator=gen, dtype=F64))
        weights[key] = a_sv[:, None] * v.T if "lora_A" in key else u * b_sv
    weights = {k: v.contiguous() for k, v in weights.items()}
    save_file(weights, str(lora_dir / "adapter_model.safetensors"))
    sigma = a_sv * b_sv * 2.0  # singular values of dW (scaling 12 / 6)
    for rank in (2, 4):
        report = comol.compose_loras(tiny_model(dtype=F64), [lora_dir], rank=rank).comol_composition
        predicted = math.sqrt(float(sigma[rank:].square().sum() / sigma.square().sum()))
        for errs in report.errors.values():
            assert errs[0] == pytest.approx(predicted, rel=1e-10)


def test_truncation_keeps_the_directions_of_the_scaled_updates(tmp_path: Path) -> None:
    # LoRA 0: scaling 100 on a small B; LoRA 1: scaling 0.01 on a large B. The stack is of the scaled B's,
    # so rank 2 keeps LoRA 0 (the large update), whatever the raw sizes of B.
    big = make_lora(tmp_path / "big", seed=1, std=0.3, r=2, lora_alpha=200, target_modules=["q_proj"])
    small = make_lora(tmp_path / "small", seed=2, std=0.3, r=2, lora_alpha=0.02, target_modules=["q_proj"])
    weights = load_file(str(small / "adapter_model.safetensors"))
    weights = {k: v * (30.0 if "lora_B" in k else 0.1) for k, v in weights.items()}
    save_file(weights, str(small / "adapter_model.safetensors"))
    errors = comol.compose_loras(tiny_model(dtype=F64), [big, small], rank=2).comol_composition.errors
    for errs in errors.values():
        assert errs[0] < 0.1 < 0.9 < errs[1]


def test_arrow_router_rows_are_the_top_singular_directions(lora_dirs: list[Path]) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs, router_init="arrow")
    for e, lora_dir in enumerate(lora_dirs):
        for name, dw in dense_updates(lora_dir).items():
            layer = model.get_submodule(f"base_model.model.{name}")
            w = layer.comol_router["default"].weight[e]  # (R,)
            prototype = w @ layer.comol_A["default"].weight  # (d_in,): the row as a direction of x
            top = torch.linalg.svd(dw).Vh[0]
            assert abs(float(prototype @ top)) == pytest.approx(1.0, abs=1e-10)
    # without core routing the router acts on x directly, with the same prototypes
    plain = comol.compose_loras(tiny_model(dtype=F64), lora_dirs, router_init="arrow", core_router=False)
    for name, layer in mixture_layers(plain).items():
        core_layer = model.get_submodule(name)
        expected = core_layer.comol_router["default"].weight @ core_layer.comol_A["default"].weight
        torch.testing.assert_close(layer.comol_router["default"].weight, expected, rtol=0, atol=1e-12)


def test_save_load_round_trip(lora_dirs: list[Path], input_ids: torch.Tensor, tmp_path: Path) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs, router_init="arrow")
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(str(tmp_path / "composed"))
    loaded = PeftModel.from_pretrained(tiny_model(dtype=F64), str(tmp_path / "composed"))
    assert isinstance(loaded.peft_config["default"], comol.CoMoLConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=0, atol=1e-12)


def test_decompose_returns_the_original_loras(
    lora_dirs: list[Path], input_ids: torch.Tensor, tmp_path: Path
) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    experts = comol.decompose(model)
    assert len(experts) == len(lora_dirs)
    for e, (expert, lora_dir) in enumerate(zip(experts, lora_dirs, strict=True)):
        assert set(expert.errors) == set(
            dense_updates(lora_dir)
        )  # modules the LoRA did not adapt are left out
        expert.save_pretrained(tmp_path / f"e{e}")
        torch.testing.assert_close(
            lora_logits(tmp_path / f"e{e}", input_ids), lora_logits(lora_dir, input_ids), rtol=0, atol=1e-10
        )


def test_decompose_at_lower_rank_reports_the_svd_error(lora_dirs: list[Path]) -> None:
    model = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    expert = comol.decompose(model, rank=3)[0]
    assert expert.config.r == 3
    reference = dense_updates(lora_dirs[0])
    for name, error in expert.errors.items():
        sigma = torch.linalg.svdvals(reference[name])
        assert error == pytest.approx(
            float((sigma[3:].square().sum() / sigma.square().sum()).sqrt()), abs=1e-9
        )


def test_truncate_lora_is_the_best_low_rank_product() -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 20, generator=gen, dtype=F64), torch.randn(15, 6, generator=gen, dtype=F64)
    a2, b2, error = truncate_lora(a, b, 2)
    dense = b @ a
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(b2 @ a2, (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-10)
    assert error == pytest.approx(
        float(torch.linalg.matrix_norm(dense - b2 @ a2) / torch.linalg.matrix_norm(dense))
    )


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
def _edit_config(lora_dir: Path, **changes) -> Path:
    path = lora_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return lora_dir


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("dora", "DoRA"),
        ("bias", "trains biases"),
        ("embedding", "adapts an embedding"),
        ("shape", "different base model"),
        ("option", "layer_replication"),
        ("pissa", "rewrites the base weights"),
        ("modules_to_save", "whole modules"),
    ],
)
def test_refuses_what_cannot_be_composed(
    kind: str, match: str, lora_dirs: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / kind
    if kind == "dora":
        make_lora(bad, seed=9, r=2, target_modules=["q_proj"], use_dora=True)
    elif kind == "bias":
        make_lora(bad, seed=9, r=2, target_modules=["q_proj"], bias="lora_only")
    elif kind == "embedding":
        make_lora(bad, seed=9, r=2, target_modules=["embed_tokens"])
    elif kind == "shape":  # a LoRA of a model with another MLP width
        from transformers import AutoModelForCausalLM

        from conftest import tiny_config

        config = tiny_config()
        config.intermediate_size = 48
        other = AutoModelForCausalLM.from_config(config).to(F64)
        peft_model = get_peft_model(other, LoraConfig(r=2, target_modules=["down_proj"]))
        randomize_adapter(peft_model)
        peft_model.save_pretrained(str(bad))
    elif kind == "option":
        _edit_config(make_lora(bad, seed=9, r=2, target_modules=["q_proj"]), layer_replication=[[0, 2]])
    elif kind == "pissa":
        _edit_config(make_lora(bad, seed=9, r=2, target_modules=["q_proj"]), init_lora_weights="pissa")
    elif kind == "modules_to_save":
        _edit_config(make_lora(bad, seed=9, r=2, target_modules=["q_proj"]), modules_to_save=["lm_head"])
    with pytest.raises(CompositionError, match=match) as info:
        comol.compose_loras(tiny_model(dtype=F64), [lora_dirs[0], bad])
    assert str(bad) in str(info.value)  # the message names the adapter


def test_refuses_bad_arguments(lora_dirs: list[Path]) -> None:
    with pytest.raises(ValueError, match="router_init"):
        comol.compose_loras(tiny_model(dtype=F64), lora_dirs, router_init="learned")
    with pytest.raises(ValueError, match="rank"):
        comol.compose_loras(tiny_model(dtype=F64), lora_dirs, rank=0)
    with pytest.raises(ValueError, match="sets"):
        comol.compose_loras(tiny_model(dtype=F64), lora_dirs, num_experts=5)
    with pytest.raises(ValueError, match="already holds adapters"):
        comol.compose_loras(PeftModel.from_pretrained(tiny_model(dtype=F64), str(lora_dirs[0])), lora_dirs)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_model(dtype=F64).save_pretrained(str(path))
    return path


def test_compose_and_decompose_cli(
    lora_dirs: list[Path],
    base_dir: Path,
    input_ids: torch.Tensor,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "composed"
    args = ["compose", "--model", str(base_dir), "--dtype", "float64", "--loras", *map(str, lora_dirs)]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert 2" in printed and "max" in printed
    assert json.loads((out / "composition.json").read_text())["rank"] == 12
    loaded = PeftModel.from_pretrained(tiny_model(dtype=F64), str(out))
    reference = comol.compose_loras(tiny_model(dtype=F64), lora_dirs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-12)

    assert main([*args, "--out", str(out)]) == 2  # never overwritten unless asked
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--rank", "4", "--force"]) == 0
    assert "Modules with the largest errors" in capsys.readouterr().out

    experts = tmp_path / "experts"
    args = [
        "decompose",
        "--model",
        str(base_dir),
        "--dtype",
        "float64",
        "--adapter",
        str(out),
        "--out",
        str(experts),
    ]
    assert main(args) == 0
    assert "expert_2: r=4" in capsys.readouterr().out
    assert sorted(p.name for p in experts.iterdir()) == ["expert_0", "expert_1", "expert_2"]
    assert PeftModel.from_pretrained(tiny_model(dtype=F64), str(experts / "expert_1")) is not None


def test_compose_cli_refusal_is_one_line(
    lora_dirs: list[Path], base_dir: Path, tmp_path: Path, capsys
) -> None:
    bad = make_lora(tmp_path / "dora", seed=9, r=2, target_modules=["q_proj"], use_dora=True)
    code = main(
        [
            "compose",
            "--model",
            str(base_dir),
            "--loras",
            str(lora_dirs[0]),
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("comol compose: error:") and "DoRA" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_gpt2_conv1d_loras_compose(tmp_path: Path, input_ids: torch.Tensor) -> None:
    lora_dir = tmp_path / "gpt2"
    model = get_peft_model(
        tiny_model("gpt2", dtype=F64), LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    randomize_adapter(model)
    model.save_pretrained(str(lora_dir))
    reference = PeftModel.from_pretrained(tiny_model("gpt2", dtype=F64), str(lora_dir))
    composed = comol.compose_loras(tiny_model("gpt2", dtype=F64), [lora_dir, lora_dir])
    with torch.no_grad():  # two identical experts: the mean is the LoRA itself
        torch.testing.assert_close(
            composed(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-10
        )
