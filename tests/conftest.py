"""Shared fixtures: tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 64


def tiny_config(family: str = "llama"):
    """A 2-layer model config of the given family (hidden 32)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    if family == "llama":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3":
        return Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
    return model.eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def randomize_adapter(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every adapter parameter random values (B = 0 at init hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(
                    torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype) * std
                )


class Wrapper(nn.Module):
    """One ``proj: Linear(d_in, d_out)``: the smallest model a layer-level test adapts (target ``"proj"``)."""

    def __init__(self, d_in: int = 12, d_out: int = 10, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
