"""Data loading, tokenisation with response-only masks, the collator and the arithmetic generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comol.data import arithmetic
from comol.data.prompts import render_prompt
from comol.demo.generation import answer_accuracy
from comol.training.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    load_records,
    split_validation,
    tokenize_record,
    tokenize_records,
)

from .tiny import make_char_tokenizer

RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer()


def test_tokenize_masks_prompt_and_appends_eos(tokenizer) -> None:
    example = tokenize_record(RECORD, tokenizer, max_length=512)
    prompt_ids = tokenizer(render_prompt(RECORD))["input_ids"]
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n:] == example["input_ids"][n:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][n:-1]) == RECORD["output"]
    full = tokenize_record(RECORD, tokenizer, max_length=512, response_only_loss=False)
    assert full["labels"] == full["input_ids"]


def test_truncation_and_long_prompts(tokenizer) -> None:
    n = len(tokenizer(render_prompt(RECORD))["input_ids"])
    cut = tokenize_record(RECORD, tokenizer, max_length=n + 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == n + 3
    assert cut["input_ids"][-1] != tokenizer.eos_token_id  # a cut response loses its EOS
    with pytest.raises(ValueError, match=r"max_length=\d+ tokens or more"):
        tokenize_records([RECORD], tokenizer, max_length=n)
    long = {**RECORD, "instruction": "x" * 400}
    kept = tokenize_records([RECORD, long], tokenizer, max_length=n + 40, long_prompts="drop")
    assert len(kept) == 1
    with pytest.raises(ValueError, match="No train examples left"):
        tokenize_records([long], tokenizer, max_length=n + 40, long_prompts="drop")


def test_load_json_jsonl_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([RECORD, RECORD]))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [RECORD] * 3))
    assert len(load_records(str(tmp_path / "a.json"))) == 2
    assert len(load_records(str(tmp_path / "a.jsonl"))) == 3
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        load_records(str(tmp_path / "empty.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "q", "response": "a"}]))
    with pytest.raises(ValueError, match=r"record 0 has no \['output'\]"):
        load_records(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="does not exist"):
        load_records(str(tmp_path / "missing.json"))


def test_load_from_datasets_directory(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([RECORD] * 4).save_to_disk(tmp_path / "ds")
    records = load_records(str(tmp_path / "ds"))
    assert len(records) == 4 and records[0]["output"] == RECORD["output"]


def test_split_validation() -> None:
    records = [{**RECORD, "instruction": str(i)} for i in range(20)]
    train, validation = split_validation(records, 0.25, seed=0)
    assert (len(train), len(validation)) == (15, 5)
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in validation)
    assert split_validation(records, 3, seed=0)[1] == split_validation(records, 3, seed=0)[1]
    with pytest.raises(ValueError, match="leaves no training"):
        split_validation(records, 20, seed=0)


def test_collator_pads_right() -> None:
    batch = CausalLMCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
         {"input_ids": [5], "attention_mask": [1], "labels": [5]}]
    )  # fmt: skip
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]


def test_arithmetic_generator_is_seeded_and_correct() -> None:
    a, b = arithmetic.generate(50, seed=3), arithmetic.generate(50, seed=3)
    assert a == b and a != arithmetic.generate(50, seed=4)
    for record in a:
        assert set(record) == {"instruction", "input", "output", "answer"}
        assert record["output"].endswith(f"The answer is {record['answer']}.")
        # The last equation of the reasoning evaluates to the answer.
        lhs, rhs = re.findall(r"(\d+ [-+*/] \d+) = (\d+)", record["output"])[-1]
        assert eval(lhs) == int(rhs) == int(record["answer"])
    train, test = arithmetic.train_test_split(200, 50, seed=0)
    assert len(train) == 200 and len(test) == 50
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in test)
    with pytest.raises(ValueError, match="Unknown problem kinds"):
        arithmetic.generate(1, kinds=("calculus",))


def test_demo_accuracy_uses_the_eval_scoring() -> None:
    assert answer_accuracy(["The answer is 5.", "The answer is 4."], [RECORD, RECORD]) == 0.5
