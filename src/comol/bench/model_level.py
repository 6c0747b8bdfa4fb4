"""Model level: a training step (forward, backward, fused AdamW) and cached greedy decoding of whole models.

:func:`bench_model` builds every variant on the same base weights (:func:`build_model_variants`), then
times training (:func:`time_training`) and decoding (:func:`time_decoding`) with interleaved repeats.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from comol.bench.config import BenchConfig
from comol.bench.memory import peak_device_memory, reset_peak_device_memory, saved_tensor_bytes
from comol.bench.timing import interleaved_medians
from comol.bench.variants import Variant, build_adapted, trainable

logger = logging.getLogger(__name__)

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


def model_rounds(cfg: BenchConfig) -> int:
    """Timed rounds of every model-level comparison: half the layer-level repeats (a whole model costs more),
    and at least three, so that the median is one round's time and a single disturbed round cannot set it."""
    return max(3, cfg.repeats // 2)


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as transformers' ``Trainer`` creates it by default (``optim="adamw_torch_fused"``): torch's fused
    implementation, one kernel for all parameters instead of a loop of small per-tensor ops."""
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def model_variants(experts: list[int]) -> list[Variant]:
    """Base, LoRA, CoMoL at the smallest, largest E (and 8), CoMoL w/o CR at E=8, baselines at the smallest E."""
    import comol

    available = set(comol.method_names())
    e_small, e_large = min(experts), max(experts)
    variants = [
        Variant("base (frozen)", None, uses_experts=False),
        Variant("lora", "lora", uses_experts=False),
    ]
    for num_experts in sorted({e_small, e_large, 8} if 8 in experts else {e_small, e_large}):
        variants.append(Variant(f"comol E={num_experts}", "comol", {"num_experts": num_experts}))
    e_mid = 8 if 8 in experts else e_small
    variants.append(Variant(f"comol w/o CR E={e_mid}", "comol", {"num_experts": e_mid, "core_router": False}))
    for name in ("molora", "hydralora"):
        if name in available:
            variants.append(Variant(f"{name} E={e_small}", name, {"num_experts": e_small}))
    if "sparsemoa" in available:  # experts fixed by the model: one per adapted linear of a block + 1
        variants.append(Variant("sparsemoa", "sparsemoa", {}))
    return variants


def build_model_variants(
    cfg: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    factory: Callable[[], nn.Module],
    variants: list[Variant],
    r: int,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Every variant on the same base weights; returns ``(label -> model, label -> error message)``.

    A variant that fails to build is recorded as an error instead of stopping the suite.
    """
    torch.manual_seed(cfg.seed)
    base = factory()  # built once (loading SmolLM2's GGUF takes seconds), copied for every variant
    models: dict[str, nn.Module] = {}
    errors: dict[str, str] = {}
    for variant in variants:
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(base)
        model.config.use_cache = True
        try:
            model = build_adapted(model, variant, r, MODEL_TARGETS)
        except Exception as err:  # a baseline under development must not stop the suite
            errors[variant.label] = f"{type(err).__name__}: {err}"
            logger.warning("model bench: %s unavailable (%s)", variant.label, errors[variant.label])
            continue
        models[variant.label] = model.to(device=device, dtype=dtype)
    return models, errors


def time_training(
    cfg: BenchConfig, device: torch.device, models: dict[str, nn.Module], ids: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Per model: step time (forward, backward, AdamW; interleaved medians), memory kept for backward, peak."""
    steps = {}
    for label, model in models.items():
        params = trainable(model)
        optimizer = adamw(params) if params else None

        def train_step(model: nn.Module = model, optimizer: torch.optim.Optimizer | None = optimizer) -> None:
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            if optimizer is not None:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps[label] = train_step
    times = interleaved_medians(steps, device, model_rounds(cfg), 1)
    results = {}
    for label, model in models.items():
        aten = aten_seconds(steps[label], 1)  # the whole step, optimizer included, as timed
        excluded = list(model.parameters()) + list(model.buffers())
        reset_peak_device_memory(device)
        with FlopCounterMode(display=False) as flops:  # matmul and attention FLOPs, forward + backward
            with saved_tensor_bytes(exclude=excluded) as saved:
                loss = model(input_ids=ids, labels=ids).loss
            if loss.requires_grad:
                loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        results[label] = {
            **times[label],
            "tokens_per_s": ids.numel() / times[label]["median_s"],
            "saved_bytes": saved.bytes,
            "flops": flops.get_total_flops(),
            "aten_s": aten,
            "peak_bytes": peak_device_memory(device),
            "trainable_params": sum(p.numel() for p in trainable(model)),
        }
    return results


def time_compiled_training(
    cfg: BenchConfig, device: torch.device, models: dict[str, nn.Module], ids: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Per model: step time with the loss (forward and backward) compiled by ``torch.compile(fullgraph=True)``.

    The first calls (compilation) are untimed warm-up; AdamW runs eagerly, as in the uncompiled step.
    """
    steps = {}
    for label, model in models.items():
        params = trainable(model)
        optimizer = adamw(params)
        model.train()

        def loss_fn(ids: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

        compiled = torch.compile(loss_fn, fullgraph=True)

        def train_step(compiled: Callable = compiled, optimizer: torch.optim.Optimizer = optimizer) -> None:
            compiled(ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[label] = train_step
    times = interleaved_medians(steps, device, model_rounds(cfg), 2)
    return {
        label: {**times[label], "tokens_per_s": ids.numel() / times[label]["median_s"], "saved_bytes": None,
                "peak_bytes": None, "trainable_params": sum(p.numel() for p in trainable(models[label]))}
        for label in models
    }  # fmt: skip


def time_decoding(
    cfg: BenchConfig, device: torch.device, models: dict[str, nn.Module], vocab: int, batch: int
) -> dict[str, float]:
    """Per model: greedy decoding time per token with the KV cache, ``(t(n new) - t(1 new)) / (n - 1)``."""
    prompt_len = 16
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + batch)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    attention_mask = torch.ones_like(prompt)

    def generate(model: nn.Module, new_tokens: int) -> Callable[[], None]:
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
        cases[f"{label}\0long"] = generate(model, cfg.decode_tokens)
        cases[f"{label}\0short"] = generate(model, 1)
    return _per_token(interleaved_medians(cases, device, model_rounds(cfg), 1), models, cfg.decode_tokens)


def _per_token(times: dict[str, dict[str, float]], labels: Any, new_tokens: int) -> dict[str, float]:
    """Per label: ``(t(n new) - t(1 new)) / (n - 1)`` from the medians of its ``"label\\0long"`` (``n`` new tokens)
    and ``"label\\0short"`` (one) cases."""
    return {
        label: (times[f"{label}\0long"]["median_s"] - times[f"{label}\0short"]["median_s"])
        / max(1, new_tokens - 1)
        for label in labels
    }


def _own_code(model: nn.Module) -> Callable[..., Any]:
    """``model``'s forward through a function with a code object of its own. Dynamo keeps compiled code per code
    object and checks the guards of every entry kept for it: timed side by side, models whose forwards share one
    code object (every ``LlamaForCausalLM.forward``) would each first fail the other's guards, which a user's
    single compiled model never does."""

    def forward(**kwargs: Any) -> Any:
        return model(**kwargs)

    forward.__code__ = forward.__code__.replace()  # a distinct (identical) code object per model
    return forward


def time_compiled_decoding(
    cfg: BenchConfig, device: torch.device, models: dict[str, nn.Module], vocab: int, batch: int
) -> dict[str, float]:
    """Per model: greedy decoding time per token with the transformers model's forward compiled by
    ``torch.compile(fullgraph=True)`` on a static KV cache (``transformers.StaticCache``, what compiled generation
    uses), measured as :func:`time_decoding` measures eager decoding: ``(t(n new) - t(1 new)) / (n - 1)``, each run
    resetting the cache and encoding the 16-token prompt (eagerly) first. The cache holds the prompt and the
    ``n`` new tokens, no more: a static cache attends over its whole length, masked, so a longer one would add
    attention time alike to every model and draw their ratio towards 1. Each model is compiled through a code
    object of its own (:func:`_own_code`), as a user's one model would be; compilation is untimed warm-up.
    """
    from transformers import StaticCache

    prompt_len = 16
    rounds = 3 * model_rounds(cfg)  # a round is milliseconds: more of them, for a stable median
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + batch)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    prompt_positions = torch.arange(prompt_len, device=device)
    positions = [torch.tensor([p], device=device) for p in range(prompt_len, prompt_len + cfg.decode_tokens)]
    cases = {}
    for label, model in models.items():
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.eval()
        cache = StaticCache(config=inner.config, max_cache_len=prompt_len + cfg.decode_tokens)
        forward = torch.compile(_own_code(inner), fullgraph=True, dynamic=False)

        def decode(
            new_tokens: int, inner: nn.Module = inner, cache: Any = cache, forward: Callable = forward
        ) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    cache.reset()
                    out = inner(input_ids=prompt, past_key_values=cache, cache_position=prompt_positions,
                                use_cache=True)  # fmt: skip
                    for position in positions[: new_tokens - 1]:
                        out = forward(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache,
                                      cache_position=position, use_cache=True)  # fmt: skip
                    out.logits[:, -1:].argmax(-1)  # the last token, as generate picks it

            return run

        cases[f"{label}\0long"] = decode(cfg.decode_tokens)
        cases[f"{label}\0short"] = decode(1)
    return _per_token(interleaved_medians(cases, device, rounds, 1), models, cfg.decode_tokens)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active (each one a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _decode_step(model: nn.Module, vocab: int, batch: int, gen: torch.Generator) -> Callable[[], Any]:
    """A cached decoding step of ``model`` (one new token for ``batch`` sequences after a 16-token prompt),
    ready to run under ``torch.inference_mode``; the prompt is encoded once, here, and each call appends one
    position to the cache."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (batch, 16), generator=gen).to(device)
    model.eval()
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    cache = out.past_key_values

    def step() -> Any:
        return model(input_ids=token, past_key_values=cache, use_cache=True)

    return step


def count_decode_ops(models: dict[str, nn.Module], vocab: int, batch: int, seed: int) -> dict[str, int]:
    """Per model: ATen operations of one cached decoding step (one new token for ``batch`` sequences after
    a 16-token prompt). Where a step is bound by per-operation cost (CPU dispatch, GPU launches) rather
    than arithmetic, as in decoding at small batch, their ratio is what the time ratio approaches."""
    gen = torch.Generator(device="cpu").manual_seed(seed + batch)
    counts = {}
    for label, model in models.items():
        step = _decode_step(model, vocab, batch, gen)
        with torch.inference_mode(), _OpCounter() as counter:
            step()
        counts[label] = counter.count
    return counts


def aten_seconds(fn: Callable[[], Any], calls: int) -> float:
    """Host time spent inside ATen operations per call of ``fn``: the sum of their self CPU times under
    ``torch.profiler``, mean over ``calls`` calls. The rest of a call's wall time is Python (module calls, the
    binding of each operation, autograd's engine). Profiling adds a little to each operation, alike for every
    model, so compare these figures between models, not with wall times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    aten_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::"))
    return aten_us / 1e6 / calls


def decode_aten_seconds(
    models: dict[str, nn.Module], vocab: int, batch: int, seed: int, steps: int = 5
) -> dict[str, float]:
    """Per model: :func:`aten_seconds` of one cached decoding step (mean over ``steps`` after one untimed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + batch)
    seconds = {}
    for label, model in models.items():
        step = _decode_step(model, vocab, batch, gen)
        with torch.inference_mode():
            step()
            seconds[label] = aten_seconds(step, steps)
    return seconds


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
    """Training rows (time, tokens/s, memory) and decode rows (time per token) of model ``name``."""
    models, errors = build_model_variants(cfg, device, dtype, factory, model_variants(cfg.experts), r)
    vocab = next(iter(models.values())).config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    rows: list[dict[str, Any]] = []
    for label, result in time_training(cfg, device, models, ids).items():
        rows.append({"model": name, "variant": label, "kind": "train", "batch": batch, "seq": seq, "r": r,
                     **result})  # fmt: skip
    compiled = [label for label in ("lora", "comol E=8") if label in models]
    if cfg.compiled_step and name in cfg.compiled_models and compiled:
        torch._dynamo.reset()
        chosen = {label: models[label] for label in compiled}
        for label, result in time_compiled_training(cfg, device, chosen, ids).items():
            rows.append({"model": name, "variant": label, "kind": "train-compiled", "batch": batch, "seq": seq,
                         "r": r, **result})  # fmt: skip
    for decode_batch in cfg.decode_batches:
        ops = count_decode_ops(models, vocab, decode_batch, cfg.seed)
        aten = decode_aten_seconds(models, vocab, decode_batch, cfg.seed)
        for label, per_token in time_decoding(cfg, device, models, vocab, decode_batch).items():
            rows.append({"model": name, "variant": label, "kind": "decode", "batch": decode_batch,
                         "new_tokens": cfg.decode_tokens, "r": r, "per_token_s": per_token,
                         "ops_per_token": ops[label], "aten_s_per_token": aten[label]})  # fmt: skip
        if cfg.compiled_step and name in cfg.compiled_models and compiled:
            torch._dynamo.reset()
            chosen = {label: models[label] for label in compiled}
            for label, per_token in time_compiled_decoding(cfg, device, chosen, vocab, decode_batch).items():
                rows.append({"model": name, "variant": label, "kind": "decode-compiled", "batch": decode_batch,
                             "new_tokens": cfg.decode_tokens, "r": r, "per_token_s": per_token})  # fmt: skip
    for label, message in errors.items():
        rows.append({"model": name, "variant": label, "kind": "error", "error": message})
    return rows
