"""Registering comol's methods with peft without forking it.

peft's :class:`peft.PeftType` is a closed ``str`` enum, but every place peft looks a method up
(``PEFT_TYPE_TO_CONFIG_MAPPING``, ``..._TUNER_MAPPING``, ``..._PREFIX_MAPPING``) is a dict keyed by that
enum's *string value*. comol therefore keeps a ``str`` enum of its own whose members have the same kind of
value (``"COMOL"``, ``"MOLORA"``, ...) and inserts them into those dicts. A saved ``adapter_config.json``
then holds ``"peft_type": "COMOL"`` and ``PeftModel.from_pretrained`` / ``model.load_adapter`` find the
right classes after ``import comol``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

if TYPE_CHECKING:
    from comol.mixture.config import MixtureConfig
    from comol.mixture.model import MixtureModel


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
    from comol.methods import METHODS

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
