"""TrainConfig: YAML + overrides, unknown keys, types, values, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from comol.errors import UserError
from comol.methods import method_names
from comol.params import PAPER_ROWS
from comol.training.config import describe, load_config
from comol.training.typed_yaml import parse_override

REPO = Path(__file__).resolve().parents[2]
SHARED = {"base.yaml", "common.yaml"}
RECIPES = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts and p.name not in SHARED
)
REQUIRED = ["model.name_or_path=m", "data.train=d.json"]


def test_yaml_base_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "org/model"}, "data": {"train": "x.json"}, "train": {"seed": 1}}
        )
    )
    (tmp_path / "run.yaml").write_text("base: base.yaml\ntrain:\n  learning_rate: 3e-4\nadapter:\n  r: 16\n")
    config = load_config(
        tmp_path / "run.yaml",
        ["train.max_steps=5", "adapter.target_modules=[q_proj,v_proj]", "adapter.options.num_experts=4"],
    )
    assert config.model.name_or_path == "org/model"
    assert config.train.seed == 1  # from the base
    assert config.train.learning_rate == pytest.approx(3e-4)  # YAML reads "3e-4" as a string
    assert config.train.max_steps == 5
    assert config.adapter.r == 16 and config.adapter.alpha == 16  # alpha defaults to r
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.adapter.options == {"num_experts": 4}


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, [*REQUIRED, "train.report_to=[]", "adapter.options.lora_dropout=0.1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=1", "Unknown config key 'train.lr'"),
        ("train.learning_rat=1", "Did you mean 'train.learning_rate'"),
        ("optimizer.lr=1", "Unknown config key 'optimizer'"),
        ("train.max_steps=ten", "train.max_steps must be an integer"),
        ("train.gradient_checkpointing=maybe", "must be true or false"),
        ("model.dtype=fp8", "model.dtype must be one of"),
        ("train.lr_scheduler=zigzag", "train.lr_scheduler must be one of"),
        ("data.template=mine", "data.template must be one of"),
        ("adapter.options.r=4", "directly under adapter"),
        ("data.val_size=1.5", "data.val_size"),
        ("train", "not of the form"),
    ],
)
def test_bad_overrides_fail_clearly(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [*REQUIRED, override])


def test_required_fields() -> None:
    with pytest.raises(ValueError, match=r"model\.name_or_path is required"):
        load_config(None, ["data.train=d.json"])
    with pytest.raises(ValueError, match=r"data\.train is required"):
        load_config(None, ["model.name_or_path=m"])


def test_unknown_method_and_option_fail_before_loading() -> None:
    with pytest.raises(ValueError, match="Unknown method 'nosuch'"):
        load_config(None, [*REQUIRED, "adapter.method=nosuch"]).validate_method()
    with pytest.raises(ValueError, match="no option"):
        load_config(
            None, [*REQUIRED, "adapter.method=lora", "adapter.options.num_experts=4"]
        ).validate_method()


def test_build_passes_method_options() -> None:
    config = load_config(
        None, [*REQUIRED, "adapter.method=lora", "adapter.r=4", "adapter.options.lora_dropout=0.2"]
    )
    peft_config = config.adapter.build(target_modules=["q_proj"])
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (4, 4, 0.2)
    assert set(peft_config.target_modules) == {"q_proj"}


def test_parse_override_values() -> None:
    assert parse_override("a.b=1e-4") == ("a.b", "1e-4")
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("--a.b=null") == ("a.b", None)


def test_describe_documents_every_field() -> None:
    rows = describe()
    assert len(rows) > 40
    undocumented = [key for key, _, _, text in rows if not text]
    assert not undocumented


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "configs")) for p in RECIPES])
def test_shipped_recipe_resolves(path: Path) -> None:
    config = load_config(path)
    assert config.adapter.lora_alpha is None or config.adapter.alpha == config.adapter.r  # alpha = rank
    assert config.train.seed is not None
    assert config.adapter.method in method_names()
    config.validate_method()


# The paper's results tables and the recipe directory of each (model presets as in comol.params).
RUN_OF_TABLE = {
    ("Table 2", "qwen3-8b"): "math14k/qwen3-8b",
    ("Table 3", "qwen3-14b"): "math14k/qwen3-14b",
    ("Table 4", "qwen3-8b"): "codealpaca/qwen3-8b",
    ("Table 4", "llama-3.1-8b"): "codealpaca/llama3.1-8b",
}


@pytest.mark.parametrize(
    "row",
    [row for row in PAPER_ROWS if (row.table, row.model) in RUN_OF_TABLE],
    ids=lambda row: f"{row.table}-{row.model}-{row.label}",
)
def test_every_row_of_the_paper_tables_has_a_recipe(row) -> None:
    """One recipe per row of Tables 2-4, with the method and the settings that give the row's Param figure."""
    stem = "comol-no-cr" if row.options.get("core_router") is False else row.method
    path = REPO / "configs" / RUN_OF_TABLE[(row.table, row.model)] / f"{stem}.yaml"
    assert path.is_file(), f"no recipe for {row.label}: {path}"
    config = load_config(path)
    assert config.adapter.method == row.method
    assert config.adapter.r == row.options["r"]
    for key, value in row.options.items():
        if key != "r":
            assert config.adapter.options[key] == value, (key, path)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_parse(name: str) -> None:
    data = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert data["num_processes"] >= 1


def test_config_file_that_is_not_utf8_is_named_with_byte_and_line(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model:\n  name_or_path: caf\xe9\n")
    with pytest.raises(UserError, match=r"run\.yaml: not UTF-8 text \(byte 26, line 2\); re-encode"):
        load_config(path)
