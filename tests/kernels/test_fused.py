"""The fused PyTorch core-mix paths against the eager reference (``comol.kernels``)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import comol
from comol import kernels
from comol.bench.memory import saved_tensor_bytes

from conftest import Wrapper


def _inputs(n: int = 6, r: int = 4, num_experts: int = 3, k: int = 5, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return t(2, n // 2, r), t(2, n // 2, k), t(num_experts, r), t(num_experts, k), t(num_experts, r, r)


# E <= r mixes through the (N, E r) outer product, E > r through per-token merged cores: test both orders.
EXPERTS = pytest.mark.parametrize("num_experts", [3, 7], ids=["E<=r", "E>r"])


@EXPERTS
def test_gradcheck_core_mix_fused(num_experts: int) -> None:
    z, _, _, _, cores = _inputs(num_experts=num_experts)
    gates = torch.softmax(torch.randn(2, 3, num_experts, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(kernels.core_mix_fused, (z, gates, cores))


@EXPERTS
@pytest.mark.parametrize("core_router", [True, False])
def test_gradcheck_routed(core_router: bool, num_experts: int) -> None:
    z, x, w_core, w_input, cores = _inputs(num_experts=num_experts)
    if core_router:
        assert torch.autograd.gradcheck(
            lambda z, w, c: kernels.routed_core_mix_fused(z, z, w, c)[0], (z, w_core, cores)
        )
    else:
        fn = lambda z, x, w, c: kernels.routed_core_mix_fused(z, x, w, c)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z, x, w_input, cores))


@pytest.mark.parametrize("num_experts", [4, 19], ids=["E<=r", "E>r"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("core_router", [True, False])
def test_routed_matches_eager(dtype: torch.dtype, tol: float, core_router: bool, num_experts: int) -> None:
    z, x, w_core, w_input, cores = _inputs(n=8, r=8, num_experts=num_experts, k=16, dtype=dtype)
    u, w = (z, w_core) if core_router else (x, w_input)
    inputs = [z, w, cores] + ([] if core_router else [x])
    results = []
    for fn in (kernels.routed_core_mix_eager, kernels.routed_core_mix_fused):
        mixed, probs = fn(z, u, w, cores)
        assert probs.dtype == torch.float32 and mixed.dtype == dtype
        grads = torch.autograd.grad(mixed, inputs, torch.ones_like(mixed))
        results.append((mixed, probs, grads))
    (m0, p0, g0), (m1, p1, g1) = results
    torch.testing.assert_close(m1, m0, atol=tol, rtol=tol)
    torch.testing.assert_close(p1, p0, atol=tol, rtol=tol)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 4, rtol=tol * 4)


def _eager_branch(x, lora_A, w, cores, lora_B, scaling, core_router, router_x=None):
    """The layer's eager steps: ``A``, the eager routed mixing, ``B``, scaling."""
    z = x @ lora_A.t()
    u = z if core_router else (x if router_x is None else router_x)
    mixed, probs = kernels.routed_core_mix_eager(z, u, w, cores)
    return scaling * mixed @ lora_B.t(), probs


ROUTINGS = pytest.mark.parametrize("routing", ["core", "input", "input, dropout"])
# Up to 64 tokens, and for E > r, the mixing merges cores per token; beyond, it contracts (g ⊗ z).
ORDERS = pytest.mark.parametrize("n", [6, 80], ids=["merged", "outer"])
# From 256 tokens with fewer than 16 experts, the CPU softmax (and its backward) runs over the token axis.
ORDERS_AND_SOFTMAX = pytest.mark.parametrize(
    "n", [6, 80, 300], ids=["merged", "outer", "outer, token-axis softmax"]
)


def _branch_inputs(n: int, routing: str, num_experts: int = 3):
    gen = torch.Generator().manual_seed(1)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    core_router = routing == "core"
    x, router_x = t(2, n // 2, 5), (t(2, n // 2, 5) if routing == "input, dropout" else None)
    w = t(num_experts, 4 if core_router else 5)
    return x, t(4, 5), w, t(num_experts, 4, 4), t(6, 4), 1.7, core_router, router_x


@ORDERS_AND_SOFTMAX
@ROUTINGS
@pytest.mark.parametrize("num_experts", [3, 7], ids=["E<=r", "E>r"])
def test_branch_matches_eager_float64(n: int, routing: str, num_experts: int) -> None:
    args = _branch_inputs(n, routing, num_experts)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    results = []
    for fn in (_eager_branch, kernels.comol_branch_fused):
        delta, probs = fn(*args)
        grads = torch.autograd.grad(delta, tensors, torch.ones_like(delta) + delta.detach())
        results.append((delta, probs, grads))
    (d0, p0, g0), (d1, p1, g1) = results
    assert d1.shape == (2, n // 2, 6) and p1.shape == (2, n // 2, num_experts) and not p1.requires_grad
    torch.testing.assert_close(d1, d0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1, p0.to(p1.dtype), rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@ORDERS_AND_SOFTMAX
@ROUTINGS
@pytest.mark.parametrize("num_experts", [3, 7], ids=["E<=r", "E>r"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no input requires grad"])
def test_branch_inference_matches_eager_float64(n: int, routing: str, num_experts: int, mode: str) -> None:
    """Without autograd (decoding) the branch takes its own path, on the leading dimensions as given."""
    args = _branch_inputs(n, routing, num_experts)
    with torch.no_grad():
        d0, p0 = _eager_branch(*args)
    if mode == "no input requires grad":
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        d1, p1 = kernels.comol_branch_fused(*detached)
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            d1, p1 = kernels.comol_branch_fused(*args)
    assert d1.shape == (2, n // 2, 6) and p1.shape == (2, n // 2, num_experts)
    assert not d1.requires_grad and p1.dtype == torch.float64
    torch.testing.assert_close(d1, d0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1, p0.to(p1.dtype), rtol=1e-12, atol=1e-12)


@ORDERS
@ROUTINGS
def test_gradcheck_branch(n: int, routing: str) -> None:
    x, lora_A, w, cores, lora_B, scaling, core_router, router_x = _branch_inputs(n, routing)

    def fn(x, router_x, lora_A, w, cores, lora_B):
        return kernels.comol_branch_fused(x, lora_A, w, cores, lora_B, scaling, core_router, router_x)[0]

    assert torch.autograd.gradcheck(fn, (x, router_x, lora_A, w, cores, lora_B))


def test_branch_skips_the_input_gradient_nobody_needs() -> None:
    x, lora_A, w, cores, lora_B, scaling, _, _ = _branch_inputs(80, "core")
    x = x.detach()
    delta, _ = kernels.comol_branch_fused(x, lora_A, w, cores, lora_B, scaling, True)
    delta.sum().backward()
    assert x.grad is None and lora_A.grad is not None and w.grad is not None


def _model(kernel: str, **options) -> nn.Module:
    torch.manual_seed(0)
    config = comol.CoMoLConfig(
        r=4, lora_alpha=8, num_experts=3, target_modules=["proj"], init_weights=False, **options
    )
    model = get_peft_model(Wrapper(16, 12, bias=True), config)
    model.base_model.set_implementation(kernel)
    return model


LAYER_OPTIONS = [{}, {"core_router": False}, {"router_top_k": 2}, {"aux_loss_coef": 0.1},
                 {"lora_dropout": 0.3}, {"lora_dropout": 0.3, "core_router": False}]  # fmt: skip


@pytest.mark.parametrize("options", LAYER_OPTIONS)
def test_layer_fused_equals_eager(options: dict) -> None:
    x = torch.randn(2, 5, 16, requires_grad=True)
    outs = []
    for kernel in ("eager", "fused"):
        model = _model(kernel, **options)
        seen = []
        for layer in comol.mixture.mixture_layers(model).values():
            layer.register_gate_hook(lambda *args, seen=seen: seen.append(args[2]))  # args[2]: probs
        torch.manual_seed(1)  # the same dropout mask for both
        y = model(x)
        loss = y.square().sum()
        aux = comol.collect_aux_loss(model)
        if aux is not None:
            loss = loss + aux
        grads = torch.autograd.grad(loss, [x, *(p for p in model.parameters() if p.requires_grad)])
        outs.append((y, seen[0], grads))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    for a, b in zip(outs[1][2], outs[0][2], strict=True):
        torch.testing.assert_close(a, b)


def test_fused_saves_less_than_eager() -> None:
    x = torch.randn(64, 16, requires_grad=True)
    saved = {}
    for kernel in ("eager", "fused"):
        model = _model(kernel)
        with saved_tensor_bytes(exclude=model.parameters()) as s:
            model(x)
        saved[kernel] = s.bytes
    # eager also keeps the float32 probs (N, E) and the expert outputs (N, E, r)
    assert saved["eager"] - saved["fused"] >= 64 * 3 * 4 * 4


def test_auto_picks_fused_on_cpu() -> None:
    assert kernels.resolve_core_mix("auto", torch.zeros(1, 4)) == "fused"


def test_fused_under_compile_and_checkpoint() -> None:
    x = torch.randn(3, 16, requires_grad=True)
    reference = _model("eager")
    expected = torch.autograd.grad(reference(x).sum(), x)[0]
    model = _model("fused")
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x).sum(), x)[0], expected)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], expected)


class _ShardedRouter(nn.Module):
    """Stands for a router wrapped as its own FSDP1 unit: not an ``nn.Linear``, and outside its forward its
    ``weight`` is a flat shard (here: the first half of the flattened weight)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        flat = self.inner.weight.reshape(-1)
        return flat[: flat.numel() // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_wrapped_router_takes_the_path_through_its_forward() -> None:
    """The fused path reads the router weight directly; a wrapped (e.g. FSDP1-sharded) router must be called
    instead, with the same result as the eager reference."""
    x = torch.randn(2, 5, 16)
    expected = _model("eager")(x)
    model = _model("fused")
    layer = next(iter(comol.mixture.mixture_layers(model).values()))
    layer.comol_router["default"] = _ShardedRouter(layer.comol_router["default"])
    torch.testing.assert_close(model(x), expected)


def test_set_implementation_checks_names_and_takes_effect_after_a_forward() -> None:
    model = _model("auto")
    layer = next(iter(comol.mixture.mixture_layers(model).values()))
    x = torch.randn(4, 16)
    model(x)
    assert layer.implementation_for(x).name == "fused"
    model.base_model.set_implementation("eager")  # the resolution cached for "auto" must not be reused
    assert layer.implementation_for(x).name == "eager"
    with pytest.raises(ValueError, match="unknown implementation 'nope'"):
        model.base_model.set_implementation("nope")
    molora = get_peft_model(
        Wrapper(16, 12, bias=True), comol.build_config("molora", r=4, num_experts=2, target_modules=["proj"])
    )
    with pytest.raises(ValueError, match=r"choose one of \['auto', 'eager'\]"):
        molora.base_model.set_implementation("fused")
