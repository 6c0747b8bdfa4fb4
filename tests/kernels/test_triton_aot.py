"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

Triton compiles for a named target (``GPUTarget``) with no device present, and ``ptxas`` (shipped with its
nvidia backend) reports registers and spills, so type errors, shape constraints, register spills and
shared-memory overflows show up on CPU. Covered:

- dtypes the CoMoL layer really passes (``test_layer_passes_these_dtypes`` records them): all float32; all
  bf16 / all fp16 (an adapter cast to the base's half dtype); autocast, where ``z`` (and ``router_input``
  for core-space routing) is bf16/fp16 while the router weight, the cores and an input-routing
  ``router_input`` stay float32 (peft's fp32 adapter);
- the recipes' shapes: ``r`` 8-64, ``E`` 2-64, router input width ``r`` or ``d_in`` up to 5120 (only
  ``BLOCK_K = min(64, k)`` and the divisibility of ``k`` by 16 depend on it, so one ``d_in`` stands for all);
- limits of the smallest GPU claimed, A100 (sm_80): at most 163 KiB (166,912 bytes) of shared memory per
  block (H100, sm_90: 227 KiB), no register spills.

Each distinct specialisation (compile-time constants, dtypes, divisibility) is compiled once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes per block (opt-in maximum): A100, H100
ARCHS = tuple(SHARED_LIMIT)
TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (z, router_input, router_weight, cores) dtypes
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {
    "fp32": (F32, F32, F32, F32),
    "bf16": (BF16, BF16, BF16, BF16),
    "fp16": (F16, F16, F16, F16),
    "autocast-bf16-core-routing": (BF16, BF16, F32, F32),
    "autocast-bf16-input-routing": (BF16, F32, F32, F32),
    "autocast-fp16-core-routing": (F16, F16, F32, F32),
    "autocast-fp16-input-routing": (F16, F32, F32, F32),
}
# (r, E, k): the corners of the recipes' range and a typical case; k = r means core-space routing
SHAPES = [(8, 2, 8), (16, 8, 4096), (32, 32, 32), (8, 64, 5120), (64, 2, 5120), (64, 64, 64), (64, 64, 5120)]


def _pointer(dtype: torch.dtype) -> str:
    return "*" + TL[dtype]


def _source(kernel_name: str, signature: tuple, constexprs: tuple, attrs: tuple):
    from triton.compiler import ASTSource

    from comol.kernels import triton_kernels

    kernel = getattr(triton_kernels, kernel_name)
    return ASTSource(
        kernel, dict(signature), dict(constexprs), {(i,): [["tt.divisibility", 16]] for i in attrs}
    )


def lower_to_ttgir(kernel_name: str, arch: int, signature: tuple, constexprs: tuple, attrs: tuple,
                   num_warps: int) -> None:  # fmt: skip
    """Front end and GPU layouts only (type checks, ``tl.dot`` operand rules): well under a second."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    src = _source(kernel_name, signature, constexprs, attrs)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)  # fmt: skip
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata = {"hash": "aot-check", "target": target, **options.__dict__}
    for stage in ("ttir", "ttgir"):
        module = stages[stage](module, metadata)


def compile_and_check(kernel_name: str, arch: int, signature: tuple, constexprs: tuple, attrs: tuple,
                      num_warps: int) -> tuple[int, int, int]:  # fmt: skip
    """Compile one specialisation to a cubin; returns (shared bytes, registers, spilled bytes)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    src = _source(kernel_name, signature, constexprs, attrs)
    log = io.StringIO()
    with (
        triton.knobs.compilation.scope(),
        triton.knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return compiled.metadata.shared, registers, spills


def _specialise(kernel_name: str, args: dict, constexprs: dict) -> tuple[tuple, tuple, tuple]:
    """Signature, constants and divisibility attributes as Triton's launcher would derive them.

    Pointers from PyTorch allocations are 16-byte aligned; integers divisible by 16 are specialised.
    """
    from comol.kernels import triton_kernels

    names = getattr(triton_kernels, kernel_name).arg_names
    signature, attrs = {}, []
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(args[name], torch.dtype):
            signature[name] = _pointer(args[name])
            attrs.append(i)
        else:
            signature[name] = "i32"
            attrs += [i] if args[name] % 16 == 0 else []
    return tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(attrs)


def specialisations(
    shapes: list, dtypes: list[str], n: int = 4096, atomic: tuple = (True, False)
) -> list[tuple]:
    """The distinct (kernel, signature, constexprs, attrs, num_warps) that these launches compile.

    ``atomic``: the ``_core_grad`` variants (``False`` is the deterministic mode: same tiles, plain stores).
    """
    from comol.kernels import triton_kernels

    found = {}
    for r, num_experts, k in shapes:
        for name in dtypes:
            zd, ud, wd, cd = DTYPES[name]
            cfg = triton_kernels.launch_config(n, k, num_experts, r, zd)
            prec = triton_kernels.precision(zd)
            ints = {"N": n, "K": k, "E": num_experts, "R": r}
            common = {"z_ptr": zd, "u_ptr": ud, "w_ptr": wd, "c_ptr": cd, **ints}
            launches = {
                "_forward": {**common, "m_ptr": zd, "p_ptr": F32},
                "_backward_tokens": {**common, "dm_ptr": zd, "dz_ptr": zd, "dl_ptr": zd, "g_ptr": zd},
                "_core_grad": {"z_ptr": zd, "dm_ptr": zd, "g_ptr": zd, "out_ptr": F32, **ints},
            }
            for kernel_name, args in launches.items():
                if kernel_name == "_core_grad":
                    variants = [{"BLOCK_N": cfg.BLOCK_N, "R_P": cfg.R_P, "ATOMIC": a} for a in atomic]
                else:
                    variants = [cfg.constexprs()]
                for constexprs in variants:
                    spec = _specialise(kernel_name, args, {**constexprs, "PRECISION": prec})
                    found[(kernel_name, *spec, cfg.num_warps)] = (r, num_experts, k, name)
    return [(*key, found[key]) for key in found]


# The largest tiles of the recipes' range: most registers in float32, most shared memory in the autocast
# mix with a float32 router input. Smaller shapes compile to smaller tiles of the same code.
LARGEST = (64, 64, 5120)
LIMIT_DTYPES = ["fp32", "autocast-bf16-input-routing"]


def _limits(arch: int) -> list[str]:
    problems = []
    for kernel_name, signature, constexprs, attrs, num_warps, example in specialisations(
        [LARGEST], LIMIT_DTYPES, atomic=(True,)
    ):
        shared, registers, spills = compile_and_check(
            kernel_name, arch, signature, constexprs, attrs, num_warps
        )
        if shared > SHARED_LIMIT[arch] or spills:
            problems.append(f"sm_{arch} {kernel_name} {example}: {shared} B shared, {registers} registers, "
                            f"{spills} B spilled")  # fmt: skip
    return problems


def test_every_dtype_and_shape_lowers_for_both_targets() -> None:
    """Type checks and GPU layouts (to TTGIR): every dtype combination at the smallest tiles for sm_80 and
    sm_90, and every recipe shape in the autocast mix for sm_90."""
    cases = [(arch, spec) for arch in ARCHS for spec in specialisations(SHAPES[:1], list(DTYPES))]
    cases += [(90, spec) for spec in specialisations(SHAPES[1:], ["autocast-bf16-input-routing"])]
    failures = []
    for arch, (kernel_name, signature, constexprs, attrs, num_warps, example) in cases:
        try:
            lower_to_ttgir(kernel_name, arch, signature, constexprs, attrs, num_warps)
        except Exception as exc:
            failures.append(f"sm_{arch} {kernel_name} {example}: {str(exc).splitlines()[-1][:160]}")
    assert not failures, "; ".join(failures)


def test_largest_tiles_fit_shared_memory_without_spills() -> None:
    """Full compile (cubin, ``ptxas -v``) of the largest tiles for sm_80 and sm_90, one process per target."""
    with ProcessPoolExecutor(len(ARCHS), mp_context=multiprocessing.get_context("spawn")) as pool:
        problems = [p for found in pool.map(_limits, ARCHS) for p in found]
    assert not problems, "; ".join(problems)


def test_autocast_mix_compiles_for_sm90() -> None:
    """The GPU crash: bf16 ``z`` with fp32 router weight and cores failed in ``_probs`` (dtype mismatch)."""
    for kernel_name, signature, constexprs, attrs, num_warps, _ in specialisations(
        [(16, 8, 16)], ["autocast-bf16-core-routing"]
    ):
        if kernel_name == "_forward":
            compile_and_check(kernel_name, 90, signature, constexprs, attrs, num_warps)
        else:
            lower_to_ttgir(kernel_name, 90, signature, constexprs, attrs, num_warps)


def test_layer_passes_these_dtypes() -> None:
    """Run CoMoL layers on CPU under autocast and record what reaches the routed kernel."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from peft import get_peft_model

    import comol
    import comol.methods.comol as comol_method

    from conftest import tiny_model

    seen = set()
    original = comol_method.kernels.get_core_mix

    def recording(name, x):
        impl = original(name, x)

        def record(z, router_input, router_weight, cores):
            seen.add(tuple(TL[t.dtype] for t in (z, router_input, router_weight, cores)))
            return impl.routed(z, router_input, router_weight, cores)

        return dataclasses.replace(impl, routed=record)

    expected = {
        tuple(TL[d] for d in dtypes) for name, dtypes in DTYPES.items() if name != "bf16" and name != "fp16"
    }
    comol_method.kernels.get_core_mix = recording
    try:
        for core_router in (True, False):
            model = get_peft_model(
                tiny_model(dtype=torch.bfloat16),
                comol.CoMoLConfig(r=8, lora_alpha=8, num_experts=4, core_router=core_router,
                                  target_modules=["q_proj"]),
            )  # fmt: skip
            model.base_model.set_implementation("fused")
            ids = torch.randint(0, 64, (2, 5))
            for autocast in (None, torch.bfloat16, torch.float16):
                with (
                    torch.no_grad(),
                    torch.autocast("cpu", dtype=autocast or F32, enabled=autocast is not None),
                ):
                    model(input_ids=ids)
    finally:
        comol_method.kernels.get_core_mix = original
    assert seen == expected
