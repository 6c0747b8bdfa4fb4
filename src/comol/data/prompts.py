"""Prompt templates shared by training and evaluation (they must match exactly).

``alpaca`` is the template of the LLM-Adapters setup that the paper trains with: an instruction, an optional
input and a response. ``chat`` renders the same fields with the tokenizer's own chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TEMPLATES: tuple[str, ...] = ("alpaca", "chat")

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(example: Mapping[str, Any], template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt (everything before the response) for one example.

    Args:
        example: a record with ``instruction`` and optionally ``input``.
        template: ``"alpaca"`` or ``"chat"`` (needs ``tokenizer`` with a chat template).
        tokenizer: a Hugging Face tokenizer, for ``template="chat"``.

    Returns:
        The prompt text; the response is appended directly after it.
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown prompt template {template!r}; choose one of {TEMPLATES}.")
    if "instruction" not in example:
        raise ValueError(f"Example has no 'instruction' field (fields: {sorted(example)}).")
    instruction = str(example["instruction"]).strip()
    extra = str(example.get("input") or "").strip()
    if template == "alpaca":
        if extra:
            return _ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
        return _ALPACA_NO_INPUT.format(instruction=instruction)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("template='chat' needs a tokenizer that has a chat template; use template='alpaca'.")
    content = f"{instruction}\n\n{extra}" if extra else instruction
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
