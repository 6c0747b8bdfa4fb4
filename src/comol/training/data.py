"""LLM-Adapters records -> tokenised causal-LM examples with response-only loss masks.

A record is a mapping with ``instruction``, ``output`` and optionally ``input`` and ``answer`` (the format of
LLM-Adapters' Math14k and of CodeAlpaca). Each becomes ``prompt ++ response ++ EOS``, where the prompt is
:func:`comol.data.prompts.render_prompt` (the same text evaluation uses) and the response is ``output``.
Prompt and response are tokenised separately, so the label mask is exact and a generated response starts
from the same prompt tokens the model saw in training.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from comol.data.prompts import render_prompt
from comol.errors import UserError
from comol.files import read_jsonl, read_utf8

logger = logging.getLogger(__name__)

REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "output")
IGNORE_INDEX = -100


def load_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Read LLM-Adapters records from a local ``.json``/``.jsonl`` file or a ``datasets`` hub id.

    Args:
        source: file path, a directory written by ``save_to_disk``, or a hub id / dataset directory
            understood by ``datasets.load_dataset``.
        split: split to read from a hub dataset.

    Returns:
        The records, each checked to have the required fields.

    Raises:
        UserError: missing file, unreadable JSON, empty dataset or records without required fields.
    """
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise UserError(f"Data file {source} does not exist.")
        records = _read_json(path)
    elif path.exists() and path.is_file():
        raise UserError(f"Data file {source} must be .json or .jsonl.")
    else:
        import datasets

        try:
            if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
                dataset = datasets.load_from_disk(str(path))  # written by save_to_disk
                if isinstance(dataset, datasets.DatasetDict):
                    dataset = dataset[split]
            else:
                dataset = datasets.load_dataset(source, split=split)
        except Exception as err:
            raise UserError(f"Cannot load dataset {source!r} (split {split!r}): {err}") from err
        records = [dict(row) for row in dataset]
    check_records(records, source)
    return records


def check_records(records: Sequence[Mapping[str, Any]], source: str = "data") -> None:
    """Raise ``UserError`` if ``records`` is empty or a record lacks a required field or has a bad one."""
    if len(records) == 0:
        raise UserError(f"{source}: the dataset is empty.")
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise UserError(f"{source}: record {i} is not a JSON object: {record!r:.80}")
        missing = [name for name in REQUIRED_FIELDS if name not in record or record[name] is None]
        if missing:
            raise UserError(
                f"{source}: record {i} has no {missing} field(s) (it has {sorted(record)}); LLM-Adapters "
                f"records need {list(REQUIRED_FIELDS)} and optionally 'input' and 'answer'."
            )
        if not str(record["output"]).strip():
            raise UserError(f"{source}: record {i} has an empty 'output'.")


def split_validation(
    records: list[dict[str, Any]], val_size: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``val_size`` records (a fraction if < 1, else a count), chosen with ``seed``.

    Returns:
        ``(train, validation)``; both keep the original relative order.
    """
    if val_size <= 0:
        return records, []
    count = round(len(records) * val_size) if val_size < 1 else int(val_size)
    count = max(1, count)
    if count >= len(records):
        raise UserError(f"data.val_size={val_size} leaves no training records (there are {len(records)}).")
    held = set(random.Random(seed).sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held]
    validation = [r for i, r in enumerate(records) if i in held]
    return train, validation


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Any,
    template: str = "alpaca",
    max_length: int = 256,
    response_only_loss: bool = True,
) -> dict[str, list[int]]:
    """Tokenise one record into ``input_ids``, ``attention_mask`` and ``labels``.

    The sequence is ``prompt ++ output ++ EOS`` cut to ``max_length`` tokens (a cut response loses its EOS).
    ``labels`` equals ``input_ids`` with the prompt set to -100 when ``response_only_loss``.

    Raises:
        PromptTooLongError: the prompt alone has ``max_length`` tokens or more (no response token would remain).
    """
    prompt = render_prompt(record, template=template, tokenizer=tokenizer)
    # The chat template already writes its special tokens; alpaca gets the tokenizer's usual BOS, if any.
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"]
    response_ids = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise UserError("The tokenizer has no EOS token; set one before training.")
    response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        raise PromptTooLongError(len(prompt_ids), max_length)
    input_ids = (prompt_ids + response_ids)[:max_length]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if response_only_loss else list(prompt_ids)
    labels = (prompt_labels + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


POSITION_LIMIT_KEYS: tuple[str, ...] = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "n_ctx",
)


def position_limit(model_config: Any) -> int | None:
    """The longest sequence a model's config allows (``max_position_embeddings``, ``n_positions``, ...), or
    None if it names no limit."""
    for key in POSITION_LIMIT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_max_length(max_length: int, model_config: Any) -> None:
    """Raise :class:`UserError` if ``data.max_length`` exceeds the model's position limit (if it has one)."""
    limit = position_limit(model_config)
    if limit is not None and max_length > limit:
        raise UserError(
            f"data.max_length={max_length} exceeds the model's position limit of {limit} tokens; set "
            f"data.max_length to {limit} or less."
        )


class PromptTooLongError(ValueError):
    """A prompt does not leave room for a single response token under ``max_length``."""

    def __init__(self, prompt_tokens: int, max_length: int) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens, max_length is {max_length}")
        self.prompt_tokens = prompt_tokens


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    template: str = "alpaca",
    max_length: int = 256,
    response_only_loss: bool = True,
    long_prompts: str = "error",
    name: str = "train",
) -> list[dict[str, list[int]]]:
    """Tokenise many records (see :func:`tokenize_record`), handling prompts that do not fit.

    Args:
        long_prompts: ``"error"`` raises if any prompt reaches ``max_length``; ``"drop"`` drops those records.
        name: split name, for messages.

    Raises:
        UserError: prompts too long under ``long_prompts="error"``, or nothing left after dropping.
    """
    examples, too_long = [], []
    for i, record in enumerate(records):
        try:
            examples.append(tokenize_record(record, tokenizer, template, max_length, response_only_loss))
        except PromptTooLongError as err:
            too_long.append((i, err.prompt_tokens))
    if too_long:
        longest = max(n for _, n in too_long)
        message = (
            f"{len(too_long)} of {len(records)} {name} prompts have max_length={max_length} tokens or more "
            f"(longest {longest}, first at record {too_long[0][0]})"
        )
        if long_prompts == "error":
            raise UserError(
                f"{message}. Raise data.max_length above {longest} or set data.long_prompts=drop."
            )
        logger.warning("%s; dropped them (data.long_prompts=drop).", message)
    if not examples:
        raise UserError(f"No {name} examples left after tokenisation.")
    return examples


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids``/``attention_mask``/``labels`` to the longest sequence of the batch.

    Args:
        pad_token_id: id written into padded ``input_ids`` positions (masked out everywhere).
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
            "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for i, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][i, :n] = torch.as_tensor(feature["attention_mask"])
            batch["labels"][i, :n] = torch.as_tensor(feature["labels"])
        return batch


def _read_json(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of records.")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records.")
    return data
