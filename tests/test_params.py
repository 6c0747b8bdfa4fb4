"""Parameter counting on meta-device models, the ``comol params`` command and the paper's "Param" columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comol.cli import main as cli_main
from comol.params import (
    PAPER_ROWS,
    PRESETS,
    TOLERANCE_M,
    count_params,
    count_params_by_depth,
    load_model_config,
    paper_table,
    paper_table_markdown,
    parse_options,
)

from conftest import tiny_config

DOC = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def table() -> list[dict]:
    return paper_table(by_depth=True)


def test_presets_have_the_real_dimensions():
    qwen = load_model_config("qwen3-8b")
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_hidden_layers) == (4096, 12288, 36)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.head_dim, qwen.vocab_size) == (
        32,
        8,
        128,
        151936,
    )
    big = load_model_config("qwen3-14b")
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.num_attention_heads) == (
        5120,
        17408,
        40,
        40,
    )
    llama = load_model_config("Llama-3.1-8B")
    assert (llama.model_type, llama.intermediate_size, llama.num_hidden_layers, llama.vocab_size) == (
        "llama",
        14336,
        32,
        128256,
    )
    assert set(PRESETS) == {"qwen3-8b", "qwen3-14b", "llama-3.1-8b"}


@pytest.mark.slow
def test_lora_on_the_full_qwen3_8b_meta_model():
    """The real 36-layer model on the meta device: 180 adapted modules, 8.19B frozen base parameters."""
    result = count_params("qwen3-8b", "lora", r=16)
    assert result.trainable == 24_772_608
    assert result.adapted_modules == 180
    assert result.base == 8_190_735_360


@pytest.mark.slow
def test_depth_shortcut_equals_the_full_count():
    full = count_params("llama-3.1-8b", "comol", r=16, num_experts=4, core_router=False).trainable
    assert full == count_params_by_depth("llama-3.1-8b", "comol", r=16, num_experts=4, core_router=False)
    assert full == 27_164_672


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda row: f"{row.table}-{row.model}-{row.label}")
def test_paper_row(row, table):
    ours = next(item["ours"] for item in table if item["row"] is row)
    if row.reachable:
        assert abs(ours / 1e6 - row.paper_m) <= TOLERANCE_M + 1e-9, (ours, row.paper_m)
    else:
        assert ours == row.expected
        assert abs(ours / 1e6 - row.paper_m) > TOLERANCE_M, "reachable after all: update the row"


def test_doc_table_is_the_generated_one(table):
    text = DOC.read_text()
    start, end = "<!-- paper-table:start -->\n", "<!-- paper-table:end -->"
    assert text.split(start, 1)[1].split(end, 1)[0] == paper_table_markdown(table), (
        "the README parameter table is stale: run comol params --paper-table --by-depth --output README.md"
    )


def test_cli_json_on_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(tiny_config("llama").to_json_string())
    code = cli_main(["params", "--model", str(path), "--method", "lora", "--r", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    # tiny llama: hidden 32, intermediate 64, 4 heads (head_dim 8), 2 KV heads, 2 layers
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (64 + 32))
    assert out["trainable_params"] == 2 * per_layer
    assert out["adapted_modules"] == 10


def test_cli_method_flags_and_options(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(tiny_config("qwen3").to_json_string())
    args = ["params", "--model", str(path), "--method", "comol", "--r", "4", "--num-experts", "3", "--json"]
    assert cli_main([*args, "--no-core-router", "--top-k", "2", "--option", "init_cores=identity"]) == 0
    without_cr = json.loads(capsys.readouterr().out)
    assert without_cr["settings"]["router_top_k"] == 2 and without_cr["settings"]["core_router"] is False
    assert cli_main(args) == 0
    with_cr = json.loads(capsys.readouterr().out)
    # w/o CR the router reads x (E x d_in) instead of z (E x r)
    d_in = 2 * (4 * 32 + 64)
    assert without_cr["trainable_params"] - with_cr["trainable_params"] == 3 * (d_in - 10 * 4)


def test_cli_rejects_unknown_options(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(tiny_config("llama").to_json_string())
    assert cli_main(["params", "--model", str(path), "--method", "comol", "--option", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="neither a preset"):
        load_model_config("no-such-model")


def test_parse_options():
    assert parse_options(["a=8", "b=true", "c=[1, 2]", "d=gelu"]) == {
        "a": 8,
        "b": True,
        "c": [1, 2],
        "d": "gelu",
    }
    with pytest.raises(ValueError):
        parse_options(["novalue"])


def test_cli_paper_table_writes_between_the_marker_lines(tmp_path, capsys, table):
    path = tmp_path / "doc.md"
    head = "# Doc\n\nThe table sits between `<!-- paper-table:start -->` and its end line.\n\n"
    path.write_text(f"{head}<!-- paper-table:start -->\nstale\n<!-- paper-table:end -->\n\nAfter.\n")
    assert cli_main(["params", "--paper-table", "--by-depth", "--output", str(path)]) == 0
    expected = (
        f"{head}<!-- paper-table:start -->\n{paper_table_markdown(table)}<!-- paper-table:end -->\n\nAfter.\n"
    )
    assert path.read_text() == expected
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--paper-table", "--model", "qwen3-8b"], "drop --model"),
        (["--paper-table", "--method", "comol", "--r", "8"], "drop --method --r"),
        (["--by-depth"], "--by-depth only apply to --paper-table"),
        (["--method", "lora"], "--model and --method are required"),
    ],
)
def test_cli_paper_table_rejects_mixed_flags(args, match, capsys):
    assert cli_main(["params", *args]) == 2
    assert match in capsys.readouterr().err


def test_cli_paper_table_refuses_a_file_without_markers_before_counting(tmp_path, capsys, monkeypatch):
    import comol.params.table

    def not_called(*args, **kwargs):
        raise AssertionError("counted before checking --output")

    monkeypatch.setattr(comol.params.table, "count_params_by_depth", not_called)
    path = tmp_path / "doc.md"
    path.write_text("no markers here\n")
    assert cli_main(["params", "--paper-table", "--by-depth", "--output", str(path)]) == 2
    assert "no <!-- paper-table:start -->" in capsys.readouterr().err
    assert path.read_text() == "no markers here\n"
    assert cli_main(["params", "--paper-table", "--output", str(tmp_path / "missing.md")]) == 2
    assert "does not exist" in capsys.readouterr().err
