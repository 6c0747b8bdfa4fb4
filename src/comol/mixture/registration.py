"""The method registry, and registering comol's methods with peft without forking it.

peft's :class:`peft.PeftType` is a closed ``str`` enum, but every place peft looks a method up
(``PEFT_TYPE_TO_CONFIG_MAPPING``, ``..._TUNER_MAPPING``, ``..._PREFIX_MAPPING``) is a dict keyed by that
enum's *string value*. comol therefore keeps a ``str`` enum of its own whose members have the same kind of
value (``"COMOL"``, ``"MOLORA"``, ...) and inserts them into those dicts. A saved ``adapter_config.json``
then holds ``"peft_type": "COMOL"`` and ``PeftModel.from_pretrained`` / ``model.load_adapter`` find the
right classes after ``import comol``.

The registry :data:`METHODS` (name -> config class) lives here, in the mechanism that defines what a method
is; each method module in :mod:`comol.methods` fills it by calling :func:`register_method` at import time
(``import comol`` imports them all). The training CLI, the parameter counter and the benchmarks look
methods up with :func:`get_config_class` / :func:`build_config`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from peft import LoraConfig, PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

if TYPE_CHECKING:
    from comol.mixture.config import MixtureConfig
    from comol.mixture.model import MixtureModel

# name -> config class: ``lora`` (peft's own) and every method that called :func:`register_method`.
METHODS: dict[str, type[PeftConfig]] = {"lora": LoraConfig}


class ComolPeftType(str, enum.Enum):
    """PEFT types of comol's methods. Values are what ``adapter_config.json`` stores as ``peft_type``."""

    COMOL = "COMOL"
    MOLORA = "MOLORA"
    HYDRALORA = "HYDRALORA"
    MOLA = "MOLA"
    ADAMOLE = "ADAMOLE"
    SMEAR = "SMEAR"
    FLYLORA = "FLYLORA"
    DENSELORA = "DENSELORA"
    SPARSEMOA = "SPARSEMOA"

    def __str__(self) -> str:  # json and f-strings show the bare value, like peft's own enum
        return self.value


def register_method(name: str, config_cls: type[MixtureConfig], model_cls: type[MixtureModel]) -> None:
    """Make method ``name`` available to peft and to comol's CLI.

    Args:
        name: lower-case method name, e.g. ``"comol"``; ``name.upper()`` must be a member of
            :class:`ComolPeftType` and ``model_cls.prefix`` must be ``name + "_"`` (transformers derives the
            parameter prefix of an adapter from its ``peft_type``).
        config_cls: the method's config dataclass.
        model_cls: the method's tuner (a :class:`~comol.mixture.model.MixtureModel` subclass).
    """
    peft_type = ComolPeftType(name.upper())
    if model_cls.prefix != f"{name}_":
        raise ValueError(f"{model_cls.__name__}.prefix must be {name + '_'!r}, got {model_cls.prefix!r}.")
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is not None and registered is not model_cls:
        raise KeyError(
            f"peft already has a different tuner registered for {peft_type.value!r}: {registered}."
        )
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    METHODS[name] = config_cls


def method_names() -> list[str]:
    """All registered method names, sorted."""
    return sorted(METHODS)


def get_config_class(name: str) -> type[PeftConfig]:
    """The PEFT config class of method ``name`` (e.g. ``"comol"``, ``"molora"``, ``"lora"``)."""
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
