"""Builders for the training tests: a character tokenizer, a tiny Llama, fast run overrides, and what the
multi-process tests need to launch (a free port, a CPU environment)."""

from __future__ import annotations

import os
import socket
import string
from pathlib import Path


def make_char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + specials); no download needed."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_overrides(model_dir: Path, data_file: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides for a fast, deterministic float32 run on the tiny model."""
    base = {
        "model.name_or_path": str(model_dir),
        "model.dtype": "fp32",
        "data.train": str(data_file),
        "data.max_length": 320,
        "adapter.method": "lora",
        "adapter.r": 4,
        "train.output_dir": str(output_dir),
        "train.micro_batch_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 4,
        "train.learning_rate": 1e-2,
        "train.logging_steps": 1,
        "train.save_steps": 2,
        "train.report_to": "[]",
        "train.disable_tqdm": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# Multi-process runs compared with one process over the same global batch (tests/training/test_ddp.py,
# test_sharded.py): plain SGD, whose update is linear in the gradient, so the different float summation of
# the distributed runs stays at rounding level (Adam's m / sqrt(v) would amplify it for near-zero
# gradients); a large learning rate, since the tiny model's gradients are small and the adapters must move.
RTOL, ATOL = 1e-5, 1e-6
SGD_COMPARISON: dict[str, object] = {
    "train.max_steps": 3,
    "train.gradient_accumulation_steps": 1,
    "train.save_steps": 2,
    "train.optim": "sgd",
    "train.learning_rate": 10.0,
}


def free_port() -> int:
    """A free TCP port on the loopback interface, for a launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a multi-process CPU launch: no CUDA, one thread per process."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }
