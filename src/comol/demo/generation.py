"""Greedy batched generation for ``comol demo``: prompts tokenised exactly as in training, and decoding
stopped as soon as a row has stated "The answer is N" (the untuned base model otherwise rambles to the
token limit on a CPU). Scoring is :mod:`comol.evaluation.math`'s, the one ``comol eval math`` uses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from comol.data.prompts import render_prompt
from comol.evaluation.math import extract_number, is_correct, parse_gold

logger = logging.getLogger(__name__)

# A finished integer answer: "answer is 42" followed by anything but a digit (demo problems are integers).
_FINISHED_RE = re.compile(r"answer is\s*\$?\s*-?\d[\d,]*[^\d,]", re.IGNORECASE)


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: str = "alpaca",
    batch_size: int = 16,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy completions of the prompts of ``records``, decoded without special tokens.

    Prompts are rendered and tokenised exactly as in training (:func:`comol.training.data.tokenize_record`)
    and left-padded so that every row continues right after its prompt.
    """
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    responses: list[str] = []
    try:
        # Shortest prompts first keeps padding low; results are put back in order.
        prompts = [
            tokenizer(render_prompt(r, template, tokenizer), add_special_tokens=template == "alpaca")[
                "input_ids"
            ]
            for r in records
        ]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            longest = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, i in enumerate(rows):
                ids = prompts[i]
                input_ids[j, longest - len(ids) :] = torch.as_tensor(ids)
                attention_mask[j, longest - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([_AnswerGiven(tokenizer, longest)]),
            )
            for j, i in enumerate(rows):
                out[i] = tokenizer.decode(generated[j, longest:], skip_special_tokens=True)
        responses = [out[i] for i in range(len(records))]
    finally:
        model.train(was_training)
    return responses


class _AnswerGiven(StoppingCriteria):
    """Stops a row once its continuation states "The answer is N" (saves decoding rambling base models)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [_FINISHED_RE.search(text) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def answer_marks(responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per response, whether its answer matches the record's ``answer``, scored exactly as
    ``comol eval math`` scores (:func:`comol.evaluation.math.extract_number` and ``is_correct``)."""
    return [
        is_correct(extract_number(text), parse_gold(r["answer"]))
        for text, r in zip(responses, records, strict=True)
    ]


def answer_accuracy(responses: Sequence[str], records: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of responses marked correct by :func:`answer_marks`."""
    if not records:
        raise ValueError("No records to score.")
    return sum(answer_marks(responses, records)) / len(records)
