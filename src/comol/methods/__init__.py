"""Registry of every adapter method comol can build: ``lora`` (peft's own) and the mixture-of-LoRA methods.

Each mixture method is a short module in this package that defines a config (a subclass of
:class:`comol.mixture.MixtureConfig`), a layer and a tuner on top of the shared mechanism in
:mod:`comol.mixture`, and calls :func:`comol.mixture.register_method` at import time.

The training CLI, the parameter counter and the benchmarks look methods up here by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft import LoraConfig, PeftConfig

# name -> config class. Filled by ``comol.mixture.register_method`` as method modules are imported.
METHODS: dict[str, type[PeftConfig]] = {"lora": LoraConfig}


def method_names() -> list[str]:
    """All registered method names, sorted."""
    _import_all()
    return sorted(METHODS)


def get_config_class(name: str) -> type[PeftConfig]:
    """The PEFT config class of method ``name`` (e.g. ``"comol"``, ``"molora"``, ``"lora"``)."""
    _import_all()
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Choose one of: {', '.join(sorted(METHODS))}.")
    return METHODS[key]


def config_fields(name: str) -> dict[str, dataclasses.Field]:
    """The dataclass fields a method's config accepts, by name."""
    return {f.name: f for f in dataclasses.fields(get_config_class(name)) if f.init}


def build_config(name: str, **kwargs: Any) -> PeftConfig:
    """Build the config of method ``name`` from keyword arguments, rejecting unknown keys.

    Example:
        >>> build_config("comol", r=16, lora_alpha=16, num_experts=8)  # doctest: +SKIP
    """
    cls = get_config_class(name)
    fields = config_fields(name)
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"Method {name!r} has no option(s) {unknown}. Its options are: {', '.join(sorted(fields))}."
        )
    return cls(**kwargs)


def _import_all() -> None:
    # Importing the method modules registers them; done lazily to avoid import cycles.
    from comol.methods import _all  # noqa: F401
