"""The reverse of composition: each expert of a mixture adapter as a standalone peft LoRA.

Expert ``e`` is the layer's LoRA for the one-hot gate ``e`` (``fixed_gate_lora``, i.e. ``scaling * B M_e A``
for CoMoL), optionally truncated to a lower rank by an exact SVD of that product computed from QRs of the
factors (no ``d_out x d_in`` matrix is formed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn

from comol.export import _peft_key, _write_adapter_dir, lora_config_for
from comol.mixture.model import mixture_layers


@dataclass
class LoraAdapter:
    """A standalone LoRA taken out of a mixture adapter.

    Attributes:
        config: its ``LoraConfig`` (scaling 1: ``lora_alpha == r``, the scaling is folded into ``lora_B``).
        state_dict: ``{peft key: tensor}`` as peft saves it (``...q_proj.lora_A.weight``).
        errors: ``{module: relative Frobenius error}`` of the rank truncation (0 at the mixture's rank).
    """

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    errors: dict[str, float]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically) into ``directory``."""
        _write_adapter_dir(Path(directory), self.config, self.state_dict)


def truncate_lora(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` LoRA of ``b @ a`` and its relative Frobenius error, without forming ``b @ a``.

    Args:
        a: ``(r, d_in)``.
        b: ``(d_out, r)``.
        rank: target rank ``k``.

    Returns:
        ``(a' (k, d_in), b' (d_out, k), error)``, error ``= sqrt(sum of discarded sigma^2 / sum sigma^2)``.
    """
    q_b, r_b = torch.linalg.qr(b)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the r x r core of b @ a in orthonormal bases
    total = s.square().sum()
    error = float((s[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return vh[:rank] @ q_a.T, q_b @ (u[:, :rank] * s[:rank]), error


@torch.no_grad()
def decompose(model: nn.Module, rank: int | None = None, adapter_name: str = "default") -> list[LoraAdapter]:
    """Every expert of a mixture adapter as a standalone LoRA: expert ``e`` is ``B M_e A`` for CoMoL.

    Args:
        model: a ``PeftModel`` with a routed comol adapter (one whose layers support ``fixed_gate_lora``).
        rank: rank of the LoRAs; None: the adapter's ``r`` (exact). A smaller rank truncates each module's
            update by SVD (the best approximation of that rank) and reports its error.
        adapter_name: which adapter.

    Returns:
        One :class:`LoraAdapter` per expert. A module whose update for an expert is exactly zero (e.g. a
        composed LoRA that did not adapt it) is left out of that expert's LoRA.
    """
    layers = {n: m for n, m in mixture_layers(model).items() if adapter_name in m.adapter_config}
    if not layers:
        raise ValueError(f"No comol layer holds an adapter named {adapter_name!r}.")
    source_config = next(iter(layers.values())).adapter_config[adapter_name]
    num_experts = getattr(source_config, "num_experts", None)
    if num_experts is None:
        raise ValueError(f"Adapter {adapter_name!r} ({source_config.peft_type}) has no experts to decompose.")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    adapters = []
    for e in range(num_experts):
        gates = torch.zeros(num_experts)
        gates[e] = 1.0
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        ranks: dict[str, int] = {}
        fan_in_fan_out = False
        for name, layer in layers.items():
            a, b = layer.fixed_gate_lora(adapter_name, gates)  # (r, d_in), (d_out, r)
            if not b.any() or not a.any():
                continue
            module = name.removeprefix("base_model.model.")
            error = 0.0
            if rank is not None and rank < a.shape[0]:
                a64, b64, error = truncate_lora(a.double(), b.double(), rank)
                a, b = a64.to(a.dtype), b64.to(b.dtype)
            key = _peft_key(name)
            tensors[f"{key}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().cpu().contiguous()
            errors[module], ranks[module] = error, a.shape[0]
            fan_in_fan_out = fan_in_fan_out or layer.is_conv1d
        if not ranks:
            raise ValueError(f"Expert {e} of adapter {adapter_name!r} is zero in every layer.")
        config = lora_config_for(ranks, fan_in_fan_out, source_config)
        adapters.append(LoraAdapter(config, tensors, errors))
    return adapters
