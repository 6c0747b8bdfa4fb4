"""The Triton routed core mix (a ``torch.library`` custom op) against the eager reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set before Triton compiles anything, hence a
subprocess) with tiny shapes: float32, and the autocast mix in float16 (Triton 3.9's interpreter computes
bfloat16 ``tl.dot`` wrongly, so bf16 is checked by the ahead-of-time compile, ``test_triton_aot.py``, and on
CUDA). On CUDA they run compiled, in float32, bfloat16 and the autocast mix.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

HERE = Path(__file__).parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _interpreted(body: str) -> None:
    script = (
        f"import sys, torch\nsys.path.insert(0, {str(HERE)!r})\nimport triton_check as c\n"
        + textwrap.dedent(body)
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_triton_interpreted_matches_eager() -> None:
    """float32, random weights, gradients included; several token blocks (150 tokens, 64 a block) so that
    the core gradient is reduced over splits, with atomics and in deterministic mode."""
    _interpreted(
        """
        c.check("cpu", torch.float32, 37, 4, 3, 4, True, 1e-4)
        c.check("cpu", torch.float32, 150, 8, 5, 24, False, 1e-4)
        c.check("cpu", torch.float32, 150, 8, 5, 8, True, 1e-4, deterministic=True)
        c.check("cpu", torch.float32, 150, 4, 3, 24, False, 1e-4, deterministic=True)
        c.check_deterministic("cpu", 150, 4, 3, 4, True)
        """
    )


def test_triton_interpreted_autocast_mix_matches_eager() -> None:
    """fp16 ``z`` with fp32 router weight and cores (peft's fp32 adapter under autocast): same values and
    dtypes as the eager path under ``torch.autocast``."""
    _interpreted(
        """
        c.check("cpu", torch.float16, 70, 8, 5, 8, True, 3e-2, weight_dtype=torch.float32)
        c.check("cpu", torch.float16, 70, 8, 5, 24, False, 3e-2, weight_dtype=torch.float32)
        """
    )


def test_custom_op_opcheck_and_compile_interpreted() -> None:
    """``torch.library.opcheck`` on both ops (schema, fake implementation, autograd registration, AOT
    dispatch) and a ``fullgraph=True`` compile through the op with its backward."""
    _interpreted('c.opcheck("cpu")\nc.compile_fullgraph("cpu")')


def test_fake_implementation_shapes_and_dtypes() -> None:
    """The fake (meta) implementations under FakeTensorMode: no kernel runs, shapes and dtypes as the op's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from comol.kernels import triton_core_mix  # noqa: F401 - registers the ops

    with FakeTensorMode():
        z = torch.empty(2, 7, 8, dtype=torch.bfloat16)
        x = torch.empty(2, 7, 32)
        w, cores = torch.empty(4, 32), torch.empty(4, 8, 8)
        mixed, probs = torch.ops.comol.routed_core_mix_triton(z, x, w, cores, False)
        grads = torch.ops.comol.routed_core_mix_triton_backward(z, x, w, cores, mixed, False)
    assert (mixed.shape, mixed.dtype) == ((2, 7, 8), torch.bfloat16)
    assert (probs.shape, probs.dtype) == ((2, 7, 4), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in (z, x, w, cores)]


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("core_router", [True, False])
@pytest.mark.parametrize(
    "shape", [(1000, 16, 8, 64), (257, 8, 64, 512), (64, 32, 5, 96), (300, 64, 64, 5120)]
)
def test_triton_cuda_matches_eager(dtype: torch.dtype, tol: float, core_router: bool, shape: tuple) -> None:
    from triton_check import check

    n, r, num_experts, k = shape
    check("cuda", dtype, n, r, num_experts, k, core_router, tol)
    if dtype == torch.bfloat16:  # the autocast mix: fp32 router weight and cores
        check("cuda", dtype, n, r, num_experts, k, core_router, tol, weight_dtype=torch.float32)
    if dtype == torch.float32:
        check("cuda", dtype, n, r, num_experts, k, core_router, tol, deterministic=True)
        from triton_check import check_deterministic

        check_deterministic("cuda", n, r, num_experts, k, core_router)


@needs_cuda
def test_auto_picks_triton_on_cuda() -> None:
    from comol import kernels

    assert kernels.resolve_core_mix("auto", torch.zeros(1, 4, device="cuda")) == "triton"


@needs_cuda
def test_training_step_has_no_host_device_sync() -> None:
    """A bf16-autocast training step of a CoMoL model (Triton path) under ``set_sync_debug_mode("error")``."""
    sys.path.insert(0, str(HERE.parent))
    from peft import get_peft_model

    import comol

    from conftest import tiny_model

    model = get_peft_model(
        tiny_model().cuda(),
        comol.CoMoLConfig(r=8, lora_alpha=8, num_experts=4, target_modules=["q_proj", "v_proj"]),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()
