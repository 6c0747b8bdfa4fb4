"""Router statistics (expert load, gate entropy, active experts per router), collected by toggleable hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comol.mixture import routing
from comol.mixture.model import routers
from comol.mixture.observe import RoutingObserver


class RouterStats:
    """Per-router mean gate (expert load), mean gate entropy and active experts over the tokens seen.

    Padding tokens are skipped when the model is called with an ``attention_mask``. Nothing is stored
    globally: the statistics live in this object, and :meth:`close` removes its hooks.

    Example::

        stats = RouterStats(model)
        model(**batch)
        stats.summary()  # {"...q_proj": {"load": [...], "entropy": 1.93, "active": 8.0, "tokens": 512}, ...}
        stats.close()

    Args:
        model: any module containing comol routers (mixture layers, SparseMoA blocks).
        enabled: start collecting at once.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._names = {router: name for name, router in routers(model).items()}
        if not self._names:
            raise ValueError("RouterStats found no comol router (mixture layer) in this model.")
        self._handles = [router.register_gate_hook(self._observe) for router in self._names]
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
        router: RoutingObserver,
        adapter_name: str,
        probs: torch.Tensor,
        gates: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        if not self.enabled:
            return
        if mask is not None:
            gates = gates[mask]
        key = self._names[router] if adapter_name == "default" else f"{self._names[router]}[{adapter_name}]"
        with torch.no_grad():
            gates = gates.double()
            load = gates.sum(0)  # (E,)
            # Entropy of each token's share of gate mass (the gates themselves for softmax routers, whose
            # gates sum to 1; SparseMoA's independent sigmoid gates are normalised first).
            share = gates / gates.sum(-1, keepdim=True).clamp_min(1e-30)
            entropy = routing.gate_entropy(share).sum()
            active = (gates > 0).sum()
        entry = self._sums.get(key)
        if entry is None:
            self._sums[key] = {"load": load, "entropy": entropy, "active": active, "tokens": gates.shape[0]}
        else:
            entry["load"] += load
            entry["entropy"] += entropy
            entry["active"] += active
            entry["tokens"] += gates.shape[0]

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{router: {"load": [E floats], "entropy": float (nats), "active": float, "tokens": int}}``.

        ``load`` is the mean gate of each expert (it sums to 1 for softmax routers), ``entropy`` the mean
        entropy of each token's normalised gates, ``active`` the mean number of experts with a non-zero gate
        per token.
        """
        out = {}
        for key, entry in self._sums.items():
            tokens = max(entry["tokens"], 1)
            out[key] = {
                "load": (entry["load"] / tokens).tolist(),
                "entropy": float(entry["entropy"] / tokens),
                "active": float(entry["active"] / tokens),
                "tokens": int(entry["tokens"]),
            }
        return out

    def mean_gates(self) -> dict[str, torch.Tensor]:
        """``{layer: (E,) float32}`` mean gate per layer, e.g. for :func:`comol.export_lora`."""
        return {
            key: torch.tensor(value["load"], dtype=torch.float32) for key, value in self.summary().items()
        }
