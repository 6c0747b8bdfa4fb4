"""``comol eval harness``: lm-evaluation-harness on a tiny model + CoMoL adapter, offline, local task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comol.cli import main
from comol.evaluation.harness import lm_eval_argv

from conftest import randomize_adapter

pytest.importorskip("lm_eval")

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "red", "blue", "sky", "sea", "is"]
DOCS = [
    {"question": "the cat sat on a", "choices": ["mat", "log", "sky"], "label": 0},
    {"question": "the sky is", "choices": ["red", "blue"], "label": 1},
    {"question": "a dog ran on the", "choices": ["sea", "mat", "log"], "label": 2},
]


def test_argv_pass_through_and_model_args_merged() -> None:
    argv = lm_eval_argv(
        "base",
        ["arc_easy, gsm8k"],
        adapter="ad",
        extra=["--num_fewshot", "5", "--model_args", "dtype=bfloat16,max_length=2048", "--log_samples"],
    )
    assert argv == [
        "--model",
        "hf",
        "--model_args",
        "pretrained=base,peft=ad,dtype=bfloat16,max_length=2048",
        "--tasks",
        "arc_easy,gsm8k",
        "--num_fewshot",
        "5",
        "--log_samples",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_args", "peft=other"], "use --model BASE and --adapter DIR"),
        (["--model_args=dtype"], "expected key=value"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, extra, message) -> None:
    rc = main(["eval", "harness", "--model", str(tmp_path), "--tasks", "x", *extra])
    assert rc == 2 and message in capsys.readouterr().err


def test_missing_adapter_exit_2(tmp_path, capsys) -> None:
    rc = main(["eval", "harness", "--model", str(tmp_path), "--adapter", str(tmp_path), "--tasks", "x"])
    assert rc == 2 and "no adapter_config.json" in capsys.readouterr().err


def _tiny_model_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama with a word-level tokenizer (built offline) and a CoMoL adapter with random weights."""
    from peft import get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import comol

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        bos_token_id=1,
    )
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        comol.CoMoLConfig(r=4, lora_alpha=8, num_experts=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    randomize_adapter(peft_model, seed=1, std=0.5)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def _task_dir(tmp_path: Path) -> Path:
    data = tmp_path / "docs.json"
    data.write_text(json.dumps(DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: comol_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


def _direct_loglikelihoods(base_dir: Path, adapter_dir: Path) -> list[list[float]]:
    """log p(" " + choice | question) of every choice, computed with peft directly (the reference)."""
    from comol.evaluation.generation import load_model

    model, tokenizer = load_model(str(base_dir), str(adapter_dir), dtype="float32", device="cpu")
    out = []
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            row = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
                logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)  # (T - 1, V)
                row.append(sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
            out.append(row)
    return out


@pytest.mark.slow
def test_harness_runs_lm_eval_on_comol_adapter(tmp_path, capsys) -> None:
    """lm-eval's loglikelihoods equal peft's with the CoMoL adapter applied; results land in --output_path."""
    base_dir, adapter_dir = _tiny_model_and_adapter(tmp_path)
    tasks = _task_dir(tmp_path)
    out = tmp_path / "results"
    rc = main(
        [
            "eval",
            "harness",
            "--model",
            str(base_dir),
            "--adapter",
            str(adapter_dir),
            "--tasks",
            "comol_tiny_mc",
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--batch_size",
            "2",
            "--model_args",
            "dtype=float32",
            "--output_path",
            str(out),
            "--log_samples",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "comol_tiny_mc" in printed and "acc" in printed  # lm-eval's summary table

    results_files = sorted(out.rglob("results_*.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert results["config"]["model_args"]["peft"] == str(adapter_dir)
    samples = [json.loads(line) for f in out.rglob("samples_comol_tiny_mc_*.jsonl") for line in f.open()]
    assert len(samples) == len(DOCS)
    got = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    expected = _direct_loglikelihoods(base_dir, adapter_dir)
    for doc_id, row in enumerate(expected):
        assert got[doc_id] == pytest.approx(row, abs=1e-4)
    acc = sum(
        max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(expected, DOCS, strict=True)
    )
    assert results["results"]["comol_tiny_mc"]["acc,none"] == pytest.approx(acc / len(DOCS))


@pytest.mark.slow
def test_unknown_task_exit_2(tmp_path, capsys) -> None:
    """lm-eval's own rejection (an unknown task) is one line with exit 2, before any model is loaded."""
    rc = main(["eval", "harness", "--model", str(tmp_path / "no-model"), "--tasks", "no_such_task_xyz"])
    assert rc == 2
    assert "lm-eval: Tasks not found: no_such_task_xyz" in capsys.readouterr().err
