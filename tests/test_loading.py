"""comol.loading: the dtype vocabulary, the model and tokenizer loader, the quantization hook, SmolLM2."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comol import loading


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("FP32", torch.float32),
        ("float32", torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_dtype_names_map_to_torch_dtypes(name: object, expected: torch.dtype) -> None:
    assert loading.resolve_dtype(name) == expected


def test_auto_dtype_is_float32_on_cpu() -> None:
    assert loading.resolve_dtype("auto", "cpu") == torch.float32


def test_unknown_dtype_names_the_setting_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model\.dtype must be one of bf16, fp16, fp32, bfloat16"):
        loading.canonical_dtype("half", allow_auto=False, what="model.dtype")
    with pytest.raises(ValueError, match="auto"):
        loading.resolve_dtype("int8")
    with pytest.raises(ValueError):
        loading.canonical_dtype("auto", allow_auto=False)


def test_train_config_uses_the_same_vocabulary() -> None:
    from comol.training.config import load_config

    config = load_config(None, ["model.name_or_path=m", "data.train=d.json", "model.dtype=bfloat16"])
    assert config.model.dtype == "bf16"
    with pytest.raises(ValueError, match=r"model\.dtype must be one of"):
        load_config(None, ["model.name_or_path=m", "data.train=d.json", "model.dtype=auto"])


def test_load_causal_lm_and_tokenizer_from_a_directory(tmp_path: Path) -> None:
    from tests.training.tiny import make_char_tokenizer, make_tiny_model

    tokenizer = make_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    make_tiny_model(len(tokenizer)).save_pretrained(tmp_path)
    model = loading.load_causal_lm(tmp_path, dtype="bf16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert loading.load_tokenizer(tmp_path).encode("12") == tokenizer.encode("12")


def test_quantization_names_are_checked_before_loading(tmp_path: Path) -> None:
    assert (
        loading.quantization_kwargs(None, torch.float32)
        == loading.quantization_kwargs("none", torch.float32)
        == {}
    )
    with pytest.raises(ValueError, match="quantization must be one of none, nf4, fp4, int8; got 'int4'"):
        loading.load_causal_lm(tmp_path, quantization="int4")


def test_only_the_gguf_quantizer_marker_is_dropped() -> None:
    def marked(method: str) -> SimpleNamespace:
        quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method))
        config = SimpleNamespace(quantization_config={"quant_method": method})
        return SimpleNamespace(hf_quantizer=quantizer, is_quantized=True, config=config)

    gguf, bnb = marked("gguf"), marked("bitsandbytes")
    loading.drop_gguf_quantizer(gguf)
    loading.drop_gguf_quantizer(bnb)
    assert (
        gguf.hf_quantizer is None
        and not gguf.is_quantized
        and not hasattr(gguf.config, "quantization_config")
    )
    assert bnb.hf_quantizer is not None and bnb.is_quantized


@pytest.mark.slow
def test_smollm2_loads_dequantised_and_trainable() -> None:
    if not loading.smollm2_installed():
        pytest.skip(f"needs SmolLM2 ({loading.SMOLLM2_INSTALL}) and the gguf package")
    model = loading.load_smollm2()
    assert model.hf_quantizer is None and not model.is_quantized
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.model_type == "llama"
