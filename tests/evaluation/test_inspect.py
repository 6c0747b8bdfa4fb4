"""``comol inspect``: the router pictures are written and their numbers are RouterStats'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tests.training.tiny import make_char_tokenizer, make_tiny_model

import comol
from comol.cli import main
from comol.evaluation.router_report import FILES, read_texts
from comol.methods import build_config
from comol.mixture import routers

RECORDS = [
    {"instruction": "Add 2 and 3.", "output": "5"},
    {"instruction": "What is 7 times 6?", "input": "Be brief.", "output": "42"},
    {"text": "plain text works too"},
    {"instruction": "Subtract 4 from 9.", "output": "5"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = make_char_tokenizer()
    tokenizer.save_pretrained(path)
    make_tiny_model(len(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    return path


def save_adapter(model_dir: Path, path: Path, method: str, **options) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, build_config(method, r=4, lora_alpha=8, **options))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(path)
    return path


def expected_stats(model_dir: Path, adapter: Path, texts: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    first: dict[str, list[int]] = {}
    with torch.no_grad(), comol.RouterStats(model) as stats:
        for index, text in enumerate(texts):
            handles = []
            if index == 0:
                for name, router in routers(model).items():
                    handles.append(
                        router.register_gate_hook(
                            lambda r, a, p, g, m, name=name: first.setdefault(name, g.argmax(-1).tolist())
                        )
                    )
            model(**tokenizer(text, return_tensors="pt"))
            for handle in handles:
                handle.remove()
        return stats.summary(), first


def inspect(model_dir: Path, adapter: Path, data: Path, out: Path, *extra: str) -> int:
    args = ["inspect", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data)]
    return main([*args, "--out", str(out), "--device", "cpu", "--dtype", "fp32", *extra])


@pytest.mark.parametrize(
    ("method", "options"), [("comol", {"num_experts": 3}), ("smear", {"num_experts": 3})]
)
def test_inspect_writes_pictures_and_routerstats_numbers(model_dir, data_file, tmp_path, method, options):
    adapter = save_adapter(model_dir, tmp_path / "adapter", method, **options)
    out = tmp_path / "report"
    assert inspect(model_dir, adapter, data_file, out, "--limit", "3", "--examples", "2") == 0
    for name in FILES.values():
        assert (out / name).stat().st_size > 0
    for name in ("router_load.png", "router_entropy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "router_report.json").read_text())
    texts = read_texts(data_file, limit=3)
    summary, first = expected_stats(model_dir, adapter, texts)
    assert report["texts"] == 3 and list(report["routers"]) == list(summary)
    for key, entry in summary.items():
        got = report["routers"][key]
        assert got["tokens"] == entry["tokens"]
        assert got["load"] == pytest.approx(entry["load"], abs=1e-6)
        assert got["entropy"] == pytest.approx(entry["entropy"], abs=1e-6)
        assert got["active"] == pytest.approx(entry["active"], abs=1e-6)
    assert len(report["examples"]) == 2
    example = report["examples"][0]
    assert "".join(example["tokens"]) == texts[0]
    for key, dominant in first.items():
        expanded = dominant * len(example["tokens"]) if len(dominant) == 1 else dominant  # instance routing
        assert example["dominant"][key] == expanded
    page = (out / "router_tokens.html").read_text()
    assert page.count("<table>") == 2 and "layers.1.self_attn.q_proj" in page


def test_inspect_refuses_bad_input_without_traceback(model_dir, data_file, tmp_path, capsys):
    adapter = save_adapter(model_dir, tmp_path / "adapter", "comol", num_experts=2)
    out = tmp_path / "report"
    assert inspect(model_dir, adapter, tmp_path / "missing.json", out) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "?"}]))
    assert inspect(model_dir, adapter, bad, out) == 2
    assert "record 0 has neither a 'text' nor an 'instruction'" in capsys.readouterr().err
    assert inspect(model_dir, tmp_path, data_file, out) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert inspect(model_dir, adapter, data_file, out, "--limit", "1", "--examples", "1") == 0
    assert inspect(model_dir, adapter, data_file, out, "--limit", "1") == 2  # nothing overwritten unasked
    assert "--overwrite" in capsys.readouterr().err
    assert inspect(model_dir, adapter, data_file, out, "--limit", "1", "--overwrite") == 0
    dense = save_adapter(model_dir, tmp_path / "dense", "denselora")
    assert inspect(model_dir, dense, data_file, tmp_path / "dense-report", "--limit", "1") == 2
    assert "has no router (e.g. DenseLoRA)" in capsys.readouterr().err
