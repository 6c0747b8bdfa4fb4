"""Loading comol adapters: weights that do not belong to the adapter are refused, and a saved adapter says
that it needs comol.

- :func:`check_loaded_adapter`: run by every comol tuner when peft loads an adapter's weights
  (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, ``set_peft_model_state_dict``, with or
  without ``low_cpu_mem_usage``). Every tensor of the adapter being loaded must be in the weights; otherwise
  peft would only warn about missing keys and leave an untrained adapter. Other adapters of the model are
  not looked at, so loading a second adapter next to a first one works as before.
- :func:`check_adapter_dir`: what comol's own loaders check in an adapter directory before loading
  anything (``adapter_config.json`` readable, its ``peft_type`` known, the weights of that method).
- :func:`write_card_note`: the paragraph every saved comol adapter's ``README.md`` gets, saying that it
  needs ``pip install comol`` and ``import comol`` (peft alone fails with ``KeyError: 'COMOL'``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from torch import nn

from comol.errors import UserError

logger = logging.getLogger(__name__)

NEEDS_COMOL = (
    "comol adapters need `pip install comol` and `import comol` before `PeftModel.from_pretrained` "
    "(or `model.load_adapter`): importing comol registers its methods with peft"
)
"""The hint of every error about a comol method peft does not know."""

CARD_HEADING = "## Loading this adapter (needs comol)"
"""The heading of the paragraph :func:`write_card_note` adds; its presence makes the note idempotent."""

_SHOWN = 3  # how many tensor names an error message lists


class AdapterWeightsError(UserError):
    """The weights being loaded lack tensors of the adapter they are loaded into."""


def _has_prefix(key: str, prefix: str) -> bool:
    """True if a dotted name component of ``key`` starts with ``prefix`` (``lora_`` matches ``lora_A``, not
    ``molora_A``)."""
    return any(part.startswith(prefix) for part in key.split("."))


def adapter_keys(keys: Iterable[str], prefix: str, adapter_name: str) -> list[str]:
    """The state-dict keys of adapter ``adapter_name``: a component starting with the method ``prefix``
    (a per-adapter container) directly followed by the adapter's name, e.g. ``...q_proj.comol_A.default.weight``
    or ``base_model.denselora_encoder.default.q_proj``."""
    selected = []
    for key in keys:
        parts = key.split(".")
        if any(p.startswith(prefix) and n == adapter_name for p, n in pairwise(parts)):
            selected.append(key)
    return selected


def _short(keys: Iterable[str]) -> str:
    keys = list(keys)
    names = ", ".join(k.removeprefix("base_model.model.") for k in keys[:_SHOWN])
    return names + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def guess_method(keys: Iterable[str]) -> str | None:
    """The peft type whose parameter prefix most of ``keys`` carry (e.g. ``"LORA"``), or None."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    keys = list(keys)
    counts = {
        str(getattr(peft_type, "value", peft_type)): sum(_has_prefix(k, prefix) for k in keys)
        for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items()
        if prefix
    }
    best = max(counts, key=counts.__getitem__, default=None)
    return best if best is not None and counts[best] else None


def check_loaded_adapter(
    model: nn.Module, peft_type: str, prefix: str, adapter_name: str, state_dict: Mapping[str, Any]
) -> None:
    """Refuse to load ``state_dict`` into adapter ``adapter_name`` if any of the adapter's tensors is absent.

    Args:
        model: the model the adapter was injected into (a ``PeftModel`` or the bare model).
        peft_type: the adapter's ``peft_type`` (for the message).
        prefix: its method's parameter prefix, e.g. ``"comol_"``.
        adapter_name: the adapter being loaded.
        state_dict: the weights, keys already mapped to the model's names (peft's
            ``_remap_adapter_state_dict_for_load``).

    Raises:
        AdapterWeightsError: naming the adapter, a few of the missing tensors and the likely cause.
    """
    model_keys = list(model.state_dict().keys())
    expected = adapter_keys(model_keys, prefix, adapter_name)
    missing = [key for key in expected if key not in state_dict]
    if not missing:
        return
    head = (
        f"Cannot load adapter {adapter_name!r} ({peft_type}): {len(missing)} of its {len(expected)} tensors are "
        f"not in the weights being loaded, e.g. {_short(missing)}."
    )
    known = set(model_keys)
    foreign = [key for key in state_dict if key not in known]
    if len(missing) < len(expected):
        cause = (
            "The weights hold the adapter's other tensors, so they were likely saved with other settings "
            "(target_modules, layers_to_transform, method options) than adapter_config.json describes. Load them "
            "with the adapter_config.json saved beside them."
        )
    elif foreign:
        other = guess_method(foreign)
        which = f"{other}'s tensors" if other else "tensors this model does not have"
        cause = (
            f"The weights hold {len(foreign)} {which} instead, e.g. {_short(foreign)}: the weights file was "
            f"saved by another method than adapter_config.json's peft_type {peft_type!r} says. Load it with the "
            "adapter_config.json it was saved with."
        )
    else:
        cause = (
            "The weights hold none of this adapter's tensors: they do not belong to this adapter_config.json."
        )
    raise AdapterWeightsError(f"{head} {cause}")


def _weight_keys(directory: Path) -> list[str] | None:
    """Tensor names of ``adapter_model.safetensors`` in ``directory`` (header only), None if there is none."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return list(weights.keys())


def _comol_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comol")
    except PackageNotFoundError:
        return "not installed"


def check_adapter_dir(path: str | Path) -> str:
    """Check a saved adapter before loading it: readable config, a ``peft_type`` peft knows, and weights of
    that method. Call it after ``import comol`` (which registers comol's methods), as comol's loaders do.

    Args:
        path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Returns:
        The adapter's ``peft_type``.

    Raises:
        UserError: naming the file and the fix; for an unknown ``peft_type`` the message says that comol
            adapters need ``pip install comol`` and ``import comol``.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    directory = Path(path)
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(
            f"{directory} is not a saved adapter: it has no adapter_config.json. Pass the directory that "
            "save_pretrained wrote (it holds adapter_config.json and adapter_model.safetensors)."
        )
    try:
        config = json.loads(config_path.read_text())
        peft_type = str(config["peft_type"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(
            f"{config_path} is not a peft adapter config (no readable 'peft_type'): {err}."
        ) from err
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UserError(
            f"{config_path} has peft_type {peft_type!r}, which neither peft nor the comol imported here "
            f"({_comol_version()}) knows. {NEEDS_COMOL}; an adapter saved by a newer comol needs that comol "
            "version (`pip install -U comol`)."
        )
    keys = _weight_keys(directory)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type)
    if keys and prefix and not any(_has_prefix(key, prefix) for key in keys):
        other = guess_method(keys)
        holds = f"{other}'s tensors" if other else "no tensors of it"
        raise UserError(
            f"{directory / 'adapter_model.safetensors'} holds {holds} (e.g. {_short(keys)}), but "
            f"{config_path} says peft_type {peft_type!r} (tensors named '{prefix}...'): the weights were saved by "
            "another method. Put the adapter_config.json they were saved with beside them."
        )
    return peft_type


def write_card_note(directory: str | Path, peft_type: str) -> None:
    """Add to ``directory/README.md`` (created if absent) how to load this comol adapter.

    peft's ``save_pretrained`` writes the model card before the configs, so the note goes into the card it
    wrote; it is added once (an existing note is kept as it is).
    """
    path = Path(directory) / "README.md"
    note = (
        f"{CARD_HEADING}\n\n"
        f"This adapter is a comol adapter (`peft_type: {peft_type}`); peft alone cannot load it (it fails with "
        f"`KeyError: '{peft_type}'`). Install comol and import it before loading:\n\n"
        "```bash\npip install comol\n```\n\n"
        "```python\n"
        "import comol  # registers comol's methods with peft\n"
        "from peft import PeftModel\n\n"
        'model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")\n'
        "```\n"
    )
    text = path.read_text() if path.is_file() else ""
    if CARD_HEADING in text:
        return
    lines = text.splitlines(keepends=True)
    body = 0  # after the YAML front matter and the title, if any
    if lines and lines[0].strip() == "---":
        closing = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        body = 0 if closing is None else closing + 1
    title = next((i for i in range(body, len(lines)) if lines[i].startswith("# ")), None)
    at = body if title is None else title + 1
    path.write_text("".join(lines[:at]) + f"\n{note}\n" + "".join(lines[at:]))
