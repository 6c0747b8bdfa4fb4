"""CoMoL under autocast, as ``Trainer(bf16=True)`` runs it: fp32 adapter weights on a bf16/fp16 compute dtype.

Every implementation must train (forward and backward) and agree with the eager path under the same
autocast; the Triton kernel's own autocast checks are in ``test_triton*.py``.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import comol
from comol.mixture import mixture_layers

from conftest import randomize_adapter, tiny_model

IMPLEMENTATIONS = ["eager", "fused"]


def _step(core_router: bool, implementation: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    model = get_peft_model(
        tiny_model(),
        comol.CoMoLConfig(
            r=4, num_experts=3, core_router=core_router, target_modules=["q_proj", "down_proj"]
        ),
    )
    randomize_adapter(model)
    for layer in mixture_layers(model).values():
        layer.set_implementation(implementation)
    model.train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 for g in grads.values())  # peft keeps the adapter in fp32
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("core_router", [True, False], ids=["core-router", "input-router"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_training_step_under_autocast_matches_eager(implementation, core_router, dtype):
    loss, grads = _step(core_router, implementation, dtype)
    ref_loss, ref_grads = _step(core_router, "eager", dtype)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(
            grad, ref_grads[name], rtol=5e-2, atol=5e-2, msg=lambda m, n=name: f"{n}: {m}"
        )
