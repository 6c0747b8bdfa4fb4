"""Router statistics (expert load and gate entropy per layer), collected by hooks that can be toggled."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comol.mixture.layer import MixtureLayer
from comol.mixture.model import mixture_layers


class RouterStats:
    """Per-layer mean gate (expert load) and mean gate entropy over the tokens seen.

    Padding tokens are skipped when the model is called with an ``attention_mask``. Nothing is stored
    globally: the statistics live in this object, and :meth:`close` removes its hooks.

    Example::

        stats = RouterStats(model)
        model(**batch)
        stats.summary()  # {"...q_proj": {"load": [...], "entropy": 1.93, "tokens": 512}, ...}
        stats.close()

    Args:
        model: any module containing comol mixture layers.
        enabled: start collecting at once.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._names = {layer: name for name, layer in mixture_layers(model).items()}
        if not self._names:
            raise ValueError("RouterStats found no comol mixture layer in this model.")
        self._handles = [layer.register_gate_hook(self._observe) for layer in self._names]
        self.enabled = enabled
        self._sums: dict[str, dict[str, Any]] = {}

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        self._sums.clear()

    def close(self) -> None:
        """Remove the hooks; the statistics gathered so far stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RouterStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _observe(
        self,
        layer: MixtureLayer,
        adapter_name: str,
        probs: torch.Tensor,
        gates: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        if not self.enabled:
            return
        if mask is not None:
            gates = gates[mask]
        key = self._names[layer] if adapter_name == "default" else f"{self._names[layer]}[{adapter_name}]"
        with torch.no_grad():
            load = gates.double().sum(0)  # (E,)
            entropy = -(gates.double() * torch.log(gates.double().clamp_min(1e-30))).sum()
        entry = self._sums.get(key)
        if entry is None:
            self._sums[key] = {"load": load, "entropy": entropy, "tokens": gates.shape[0]}
        else:
            entry["load"] += load
            entry["entropy"] += entropy
            entry["tokens"] += gates.shape[0]

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"load": [E floats summing to 1], "entropy": float (nats), "tokens": int}}``."""
        out = {}
        for key, entry in self._sums.items():
            tokens = max(entry["tokens"], 1)
            out[key] = {
                "load": (entry["load"] / tokens).tolist(),
                "entropy": float(entry["entropy"] / tokens),
                "tokens": int(entry["tokens"]),
            }
        return out

    def mean_gates(self) -> dict[str, torch.Tensor]:
        """``{layer: (E,) float32}`` mean gate per layer, e.g. for :func:`comol.export_lora`."""
        return {
            key: torch.tensor(value["load"], dtype=torch.float32) for key, value in self.summary().items()
        }
