"""Estimate the GPU memory of a QLoRA run (``model.quantization=nf4|fp4|int8``) from its config, by counting.

Nothing is loaded: the base model is built on PyTorch's meta device from a preset of ``comol params``
(its real dimensions) and the run's adapter is injected with peft to count its trainable parameters.
Example (the paper's Qwen3-8B CoMoL run on Math14k)::

    python benchmarks/qlora_memory.py configs/math14k/qwen3-8b/comol.yaml --preset qwen3-8b

Assumptions (also printed):

- bitsandbytes quantizes every ``nn.Linear`` but ``lm_head``. 4-bit: 0.5 byte per weight, plus one absmax
  per block of 64 weights, in float32 (4 bytes) or, with double quantization, 8-bit with a float32
  second-level scale per 256 blocks. int8: 1 byte per weight plus one float32 scale per output row.
- ``prepare_model_for_kbit_training`` casts every other base parameter (embeddings, ``lm_head``, norms) to
  float32.
- The adapter is float32 and trained with AdamW: parameter + gradient + two moments = 16 bytes each.
- Activations with gradient checkpointing: each decoder block keeps its float32 input
  ``(B, T, d)``; one block at a time is recomputed, holding about ``B T (10 d + 4 d_ff)`` values in the
  compute dtype plus the adapters' intermediates (ignored: rank-r codes, ``r << d``); the float32 logits
  ``(B, T, V)`` and their gradient.
- Not counted: the CUDA context and allocator slack (typically 0.5-1.5 GiB), attention workspaces, and
  the dequantized copy of one weight at a time (at most ``d_ff x d`` in the compute dtype, also listed).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from comol.loading import canonical_quantization, resolve_dtype
from comol.params.counting import build_meta_model, count_on, load_model_config
from comol.training.config import load_config

GIB = 2**30
BLOCK, DOUBLE_BLOCK = 64, 256  # bitsandbytes' 4-bit blocksize and the double quantization's block of scales


def quantized_bytes_per_weight(quantization: str, double_quant: bool) -> float:
    """Storage of one quantized weight, scales included (int8's per-row scale is added separately)."""
    if quantization == "int8":
        return 1.0
    scales = (1 + 4 / DOUBLE_BLOCK) / BLOCK if double_quant else 4 / BLOCK
    return 0.5 + scales


def estimate(config_path: str, preset: str, overrides: list[str]) -> dict[str, object]:
    """The memory estimate, in bytes per item, for a ``comol train`` config on a model preset."""
    config = load_config(config_path, overrides)
    quantization = canonical_quantization(config.model.quantization)
    if quantization == "none":
        raise SystemExit("The config is not quantized; add model.quantization=nf4 (or fp4, int8).")
    model_config = load_model_config(preset)
    base = build_meta_model(model_config)
    linear = rows = other = 0
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            linear += module.weight.numel()
            rows += module.out_features
    other = sum(p.numel() for p in base.parameters()) - linear
    adapter = config.adapter
    options = {"r": adapter.r, "target_modules": adapter.target_modules, **adapter.options}
    if adapter.lora_alpha is not None:
        options["lora_alpha"] = adapter.lora_alpha
    trainable = count_on(base, adapter.method, **options).trainable

    batch, tokens = config.train.micro_batch_size, config.data.max_length
    d, d_ff, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    compute = resolve_dtype(config.model.compute_dtype or config.model.dtype, "cuda")
    compute_bytes = torch.finfo(compute).bits // 8
    weights = linear * quantized_bytes_per_weight(quantization, config.model.double_quant)
    if quantization == "int8":
        weights += 4 * rows
    items = {
        "quantized base weights": weights,
        "other base parameters (float32)": 4 * other,
        "adapter + gradients + AdamW moments": 16 * trainable,
        "checkpointed block inputs (float32)": 4 * layers * batch * tokens * d,
        "one recomputed block": compute_bytes * batch * tokens * (10 * d + 4 * d_ff),
        "logits and their gradient (float32)": 2 * 4 * batch * tokens * model_config.vocab_size,
    }
    return {
        "config": config_path,
        "preset": preset,
        "method": adapter.method,
        "quantization": quantization,
        "double_quant": config.model.double_quant,
        "compute_dtype": str(compute).removeprefix("torch."),
        "micro_batch_size": batch,
        "max_length": tokens,
        "quantized_weights": linear,
        "other_base_params": other,
        "trainable_params": trainable,
        "bytes": items,
        "total_bytes": sum(items.values()),
        "largest_dequantized_weight_bytes": compute_bytes * d * d_ff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a comol train YAML file")
    parser.add_argument(
        "--preset", required=True, help="model dimensions: a comol params preset or config.json"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides (default adds model.quantization=nf4 if unset)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("model.quantization=") for o in overrides):
        overrides.append("model.quantization=nf4")
    overrides.append("train.gradient_checkpointing=true")
    result = estimate(args.config, args.preset, overrides)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['method']} on {result['preset']}, {result['quantization']} (double quant "
        f"{result['double_quant']}, compute {result['compute_dtype']}), micro batch {result['micro_batch_size']} "
        f"x {result['max_length']} tokens, gradient checkpointing\n"
    )
    print("| Item | GiB |\n|---|---:|")
    for item, value in result["bytes"].items():
        print(f"| {item} | {value / GIB:.2f} |")
    print(
        f"| **total (CUDA context and allocator slack not included)** | **{result['total_bytes'] / GIB:.2f}** |"
    )
    print(
        f"\n{result['quantized_weights']:,} quantized weights, {result['other_base_params']:,} other base "
        f"parameters, {result['trainable_params']:,} trainable."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
