"""Routing observers: the one channel through which routers report their decisions.

A router (a :class:`~comol.mixture.layer.MixtureLayer` for per-layer methods, a decoder-block module for
SparseMoA) calls :meth:`RoutingObserver.observe_routing` once per routing decision. That feeds

- the gate hooks (:meth:`RoutingObserver.register_gate_hook`), which :class:`comol.RouterStats` uses for
  expert load and gate entropy, and
- the load-balancing loss, which :func:`comol.collect_aux_loss` hands to training.

Nothing is kept in globals: hooks and losses live on the observer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

from comol.mixture import routing

logger = logging.getLogger(__name__)

# hook(router, adapter_name, probs (N, E) float32, gates (N, E) float32, mask (N,) bool | None) -> None
GateHook = Callable[["RoutingObserver", str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


BASE_ADAPTER = "__base__"
"""The name that stands for the base model (no adapter) in ``adapter_names``, as in peft."""


class RoutingContext:
    """Per-forward information shared by a tuner and all its layers (no globals).

    The tuner sets :attr:`attention_mask` from the keyword arguments of each forward of the wrapped
    model, so that layers can ignore padding (instance-level routing, router statistics, balancing
    losses). It is kept until the next forward, so that gradient-checkpointing recomputation sees the
    same mask as the forward it repeats.

    For a mixed-adapter batch (``model(..., adapter_names=[...])``, inference only) the tuner also sets
    :attr:`adapter_names` for the duration of the call: row ``b`` uses adapter ``adapter_names[b]``
    (``"__base__"``: none).
    """

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None  # (B, T), 1 for real tokens
        self.adapter_names: list[str] | None = None  # (B,) adapter of each row of a mixed-adapter batch

    def adapter_rows(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``(adapter, rows)`` of a mixed-adapter batch, rows ``(n,)`` int64, for every adapter but ``__base__``.

        Raises:
            ValueError: ``adapter_names`` does not have one name per row.
        """
        names = self.adapter_names or []
        if len(names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(names)} names for a batch of {batch_size} rows; give one per row."
            )
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        return [
            (name, torch.tensor(rows, device=device)) for name, rows in groups.items() if name != BASE_ADAPTER
        ]

    @contextmanager
    def rows(self, rows: torch.Tensor) -> Iterator[None]:
        """While a sub-batch of ``rows`` is computed, :attr:`attention_mask` holds only those rows."""
        mask = self.attention_mask
        if mask is not None:
            self.attention_mask = mask[rows.to(mask.device)]
        try:
            yield
        finally:
            self.attention_mask = mask

    def token_mask(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """The mask as bool ``(*leading_shape)`` if it matches the tokens a layer sees, else None."""
        mask = self.attention_mask
        if mask is None or tuple(mask.shape) != tuple(leading_shape):
            return None
        return mask.bool()


class RoutingObserver:
    """Mixin for modules that route tokens to experts. Call :meth:`init_observer` in ``__init__``.

    Attributes:
        normalized_gates: True if every token's gates sum to 1 (softmax routing and its top-k or
            threshold renormalisations); False for independent per-expert gates (SparseMoA's sigmoids).
    """

    normalized_gates: bool = True
    module_key: str | None
    training: bool
    active_adapters: list[str]

    def init_observer(self, context: RoutingContext | None) -> None:
        self.context = context if context is not None else RoutingContext()
        self._gate_hooks: OrderedDict[int, GateHook] = OrderedDict()
        self._aux_losses: dict[str, torch.Tensor] = {}
        self._warned_no_grad_aux = False

    def register_gate_hook(self, hook: GateHook) -> RemovableHandle:
        """Call ``hook(router, adapter_name, probs, gates, mask)`` after every routing decision.

        ``probs`` and ``gates`` are flattened to ``(N, E)`` float32 and detached; ``mask`` is ``(N,)`` bool
        (False for padding) or None. Returns a handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    def observe_routing(
        self,
        adapter_name: str,
        probs: torch.Tensor,
        gates: torch.Tensor,
        mask: torch.Tensor | None = None,
        aux_loss_coef: float = 0.0,
    ) -> None:
        """Report one routing decision: feeds the gate hooks and records the balancing loss.

        Args:
            adapter_name: which adapter routed.
            probs: ``(..., E)`` float32 router probabilities.
            gates: ``(..., E)`` gates actually used.
            mask: ``(...)`` bool token mask, or None to take it from the routing context.
            aux_loss_coef: coefficient of :func:`comol.mixture.routing.load_balancing_loss` (0: off).
        """
        if mask is None:
            mask = self.context.token_mask(probs.shape[:-1])
        if self._gate_hooks:
            num_experts = probs.shape[-1]
            flat_mask = None if mask is None else mask.reshape(-1)
            flat_probs = probs.detach().float().reshape(-1, num_experts)
            flat_gates = gates.detach().float().reshape(-1, num_experts)
            for hook in list(self._gate_hooks.values()):
                hook(self, adapter_name, flat_probs, flat_gates, flat_mask)
        if aux_loss_coef > 0 and self.training:
            if not torch.is_grad_enabled() and not self._warned_no_grad_aux:
                logger.warning(
                    "%s: the load-balancing loss is computed without gradient (re-entrant gradient checkpointing "
                    "or no_grad); use gradient_checkpointing_kwargs={'use_reentrant': False}.",
                    self.module_key or type(self).__name__,
                )
                self._warned_no_grad_aux = True
            # Overwritten (not appended) on every forward: recomputation under gradient checkpointing
            # therefore never counts a router twice.
            self._aux_losses[adapter_name] = aux_loss_coef * routing.load_balancing_loss(probs, gates, mask)

    def pop_aux_losses(self) -> list[torch.Tensor]:
        """The auxiliary losses recorded since the last call, for the active adapters; clears them."""
        losses = [self._aux_losses[name] for name in self.active_adapters if name in self._aux_losses]
        self._aux_losses.clear()
        return losses
