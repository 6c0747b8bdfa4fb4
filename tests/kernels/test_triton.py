"""The Triton routed core mix against the eager reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set before Triton compiles anything, hence a
subprocess) with tiny shapes; on CUDA they run compiled, in float32 and bfloat16.
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


def test_triton_interpreted_matches_eager() -> None:
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from triton_check import check
        check("cpu", torch.float32, 37, 4, 3, 4, True, 1e-4)
        check("cpu", torch.float32, 20, 8, 5, 24, False, 1e-4)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("core_router", [True, False])
@pytest.mark.parametrize("shape", [(1000, 16, 8, 64), (257, 8, 64, 512), (64, 32, 5, 96)])
def test_triton_cuda_matches_eager(dtype: torch.dtype, tol: float, core_router: bool, shape: tuple) -> None:
    from triton_check import check

    n, r, num_experts, k = shape
    check("cuda", dtype, n, r, num_experts, k, core_router, tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda() -> None:
    from comol import kernels

    assert kernels.resolve_core_mix("auto", torch.zeros(1, 4, device="cuda")) == "triton"
