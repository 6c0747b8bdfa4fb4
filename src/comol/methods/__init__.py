"""Every adapter method comol can build: ``lora`` (peft's own) and the mixture-of-LoRA methods.

Each mixture method is a short module in this package that defines a config (a subclass of
:class:`comol.mixture.MixtureConfig`), a layer and a tuner on top of the shared mechanism in
:mod:`comol.mixture`, and calls :func:`comol.mixture.register_method` at import time. Importing this package
imports (and so registers) them all; add a new method to the imports below. The registry itself and its
look-ups belong to the mechanism (:mod:`comol.mixture.registration`) and are re-exported here.
"""

from comol.methods import (  # noqa: F401  (each module registers its method on import)
    adamole,
    comol,
    denselora,
    flylora,
    hydralora,
    mola,
    molora,
    smear,
    sparsemoa,
)
from comol.mixture.registration import METHODS, build_config, config_fields, get_config_class, method_names

__all__ = ["METHODS", "build_config", "config_fields", "get_config_class", "method_names"]
