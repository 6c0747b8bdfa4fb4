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


def _decode_logits(
    core_router: bool, num_experts: int, implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    model = get_peft_model(
        tiny_model(),
        comol.CoMoLConfig(
            r=4, num_experts=num_experts, core_router=core_router, target_modules=["q_proj", "down_proj"]
        ),
    )
    randomize_adapter(model)
    for layer in mixture_layers(model).values():
        layer.set_implementation(implementation)
    model.eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([out.logits, step.logits], dim=1).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("num_experts", [3, 6], ids=["E<=r", "E>r"])
@pytest.mark.parametrize("core_router", [True, False], ids=["core-router", "input-router"])
def test_cached_decoding_under_autocast_matches_eager(core_router, num_experts, dtype):
    """The decoding path (weights laid out once, fp32 adapter, bf16/fp16 activations) against eager."""
    logits = _decode_logits(core_router, num_experts, "fused", dtype)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(
        logits, _decode_logits(core_router, num_experts, "eager", dtype), rtol=3e-2, atol=3e-2
    )
