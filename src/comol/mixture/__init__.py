"""The one mechanism all of comol's mixture-of-LoRA methods are built on.

- :mod:`~comol.mixture.config`: shared config fields (peft conventions) and default target modules.
- :mod:`~comol.mixture.routing`: logits -> probs -> gates (soft, top-k), entropy, balancing loss.
- :mod:`~comol.mixture.observe`: :class:`RoutingObserver`, how routers report decisions (stats, aux losses).
- :mod:`~comol.mixture.adapters`: :class:`AdapterContainers`, peft's per-adapter bookkeeping for any module.
- :mod:`~comol.mixture.layer`: :class:`MixtureLayer`, the adapter layer a method subclasses.
- :mod:`~comol.mixture.model`: :class:`MixtureModel`, the peft tuner a method subclasses.
- :mod:`~comol.mixture.loading`: refusing weights that do not fit an adapter; the saved card's comol note.
- :mod:`~comol.mixture.stats`: :class:`RouterStats`, hooks for expert load and gate entropy.
- :mod:`~comol.mixture.registration`: makes a method known to peft and to comol's CLI.
"""

from comol.mixture.adapters import AdapterContainers
from comol.mixture.config import DEFAULT_TARGET_MODULES, MixtureConfig, RoutedMixtureConfig
from comol.mixture.layer import MergeNotSupportedError, MixtureLayer
from comol.mixture.loading import AdapterWeightsError, check_adapter_dir
from comol.mixture.model import (
    MixtureModel,
    after_optimizer_step,
    collect_aux_loss,
    mixture_layers,
    register_step_hooks,
    routers,
)
from comol.mixture.observe import RoutingContext, RoutingObserver
from comol.mixture.registration import ComolPeftType, register_method
from comol.mixture.stats import RouterStats

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterContainers",
    "AdapterWeightsError",
    "ComolPeftType",
    "MergeNotSupportedError",
    "MixtureConfig",
    "MixtureLayer",
    "MixtureModel",
    "RoutedMixtureConfig",
    "RouterStats",
    "RoutingContext",
    "RoutingObserver",
    "after_optimizer_step",
    "check_adapter_dir",
    "collect_aux_loss",
    "mixture_layers",
    "register_method",
    "register_step_hooks",
    "routers",
]
