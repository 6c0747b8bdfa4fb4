"""Loading a model (optionally with an adapter) and batched generation with left padding.

Prompts are sorted by length so that batches hold prompts of similar length, padded on the left, and
generated with the KV cache; the outputs come back in the original order. Greedy decoding by default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from comol.loading import dtype_names

logger = logging.getLogger(__name__)

DTYPES: tuple[str, ...] = dtype_names()


def load_model(
    model: str,
    adapter: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer for evaluation, with an adapter on top if given.

    Args:
        model: hub id or local directory.
        adapter: directory of a saved adapter (comol's methods or any peft method); ``comol`` is imported
            first so that its methods are registered with peft.
        gguf_file: a GGUF file inside ``model`` to load weights and tokenizer from.
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPU when supported), ``float32``, ``float16`` or
            ``bfloat16`` (or ``fp32``, ``fp16``, ``bf16``: :func:`comol.loading.dtype_names`).
        device: ``cuda``, ``cpu``, ...; by default CUDA when available.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer pads on the left and
        has a pad token.
    """
    import torch

    from comol.loading import load_causal_lm, load_tokenizer, resolve_dtype

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {DTYPES}.")
    if adapter:
        import comol  # registers comol's methods with peft

        # Before loading the model: a clear error for an unknown peft_type or weights of another method.
        comol.mixture.check_adapter_dir(adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model, gguf_file=gguf_file or None)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = load_causal_lm(model, gguf_file=gguf_file or None, dtype=resolve_dtype(dtype, device))
    if adapter:
        from peft import PeftModel

        logger.info("Loading adapter %s", adapter)
        lm = PeftModel.from_pretrained(lm, adapter)
    lm.to(device)
    lm.eval()
    return lm, tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    stop_strings: Sequence[str] | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[list[str]]:
    """Generate responses for ``prompts`` in left-padded batches.

    Args:
        model: a causal LM (or peft model) in eval mode.
        tokenizer: its tokenizer; padding side is set to left here.
        prompts: the full prompt texts.
        batch_size: prompts per forward batch.
        max_new_tokens: generation length cap.
        do_sample: sample with ``temperature``/``top_p`` instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        num_return_sequences: responses per prompt.
        stop_strings: stop a sequence when it emits one of these (the text is not truncated here).
        seed: seeds torch before generating (reproducible sampling).
        progress: show a progress bar.

    Returns:
        For each prompt (in input order), its ``num_return_sequences`` decoded responses without the prompt.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("batch_size, max_new_tokens and num_return_sequences must be at least 1.")
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": num_return_sequences,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
    }
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        gen_kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch_ids = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in batch_ids], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(**enc, **gen_kwargs)  # (b * num_return_sequences, T_prompt + T_new)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for j, i in enumerate(batch_ids):
                results[i] = texts[j * num_return_sequences : (j + 1) * num_return_sequences]
            bar.update(len(batch_ids))
    bar.close()
    return results
