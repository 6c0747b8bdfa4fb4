"""The fused PyTorch core-mix paths against the eager reference (``comol.kernels``)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import comol
from comol import kernels
from comol.bench.memory import saved_tensor_bytes

from conftest import Wrapper


def _inputs(n: int = 6, r: int = 4, num_experts: int = 3, k: int = 5, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return t(2, n // 2, r), t(2, n // 2, k), t(num_experts, r), t(num_experts, k), t(num_experts, r, r)


# E <= r mixes through the outer product of gates and codes, E > r through per-token merged cores: test both
# orders. The tokens-first mixing (core_mix_fused, routed_core_mix_fused) also merges cores up to 64 tokens.
EXPERTS = pytest.mark.parametrize("num_experts", [3, 7], ids=["E<=r", "E>r"])
# Decoding traced by torch.compile takes the fusible form up to 64 tokens (branch_inference), the matmuls above.
SIZES = pytest.mark.parametrize("n", [6, 80], ids=["few tokens", "many tokens"])
# From 256 tokens with fewer than 16 experts, a tokens-first CPU softmax runs over the token axis.
SIZES_AND_SOFTMAX = pytest.mark.parametrize(
    "n", [6, 80, 300], ids=["few tokens", "many tokens", "token-axis softmax"]
)


@SIZES
@EXPERTS
def test_gradcheck_core_mix_fused(num_experts: int, n: int) -> None:
    z, _, _, _, cores = _inputs(n=n, num_experts=num_experts)
    gates = torch.softmax(torch.randn(2, n // 2, num_experts, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(kernels.core_mix_fused, (z, gates, cores))


@SIZES_AND_SOFTMAX
@EXPERTS
@pytest.mark.parametrize("core_router", [True, False])
def test_gradcheck_routed(core_router: bool, num_experts: int, n: int) -> None:
    z, x, w_core, w_input, cores = _inputs(n=n, num_experts=num_experts)
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
@pytest.mark.parametrize("n", [8, 80], ids=["few tokens", "many tokens"])
def test_routed_matches_eager(
    dtype: torch.dtype, tol: float, core_router: bool, num_experts: int, n: int
) -> None:
    z, x, w_core, w_input, cores = _inputs(n=n, r=8, num_experts=num_experts, k=16, dtype=dtype)
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
    for a, b in zip(g1, g0, strict=True):  # summed over tokens: low-precision rounding grows with their scale
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol * 4 * scale, rtol=tol * 4)


def _eager_branch(x, lora_A, w, cores, lora_B, scaling, core_router, router_x=None):
    """The layer's eager steps: ``A``, the eager routed mixing, ``B``, scaling."""
    z = x @ lora_A.t()
    u = z if core_router else (x if router_x is None else router_x)
    mixed, probs = kernels.routed_core_mix_eager(z, u, w, cores)
    return scaling * mixed @ lora_B.t(), probs


ROUTINGS = pytest.mark.parametrize("routing", ["core", "input", "input, dropout"])


def _branch_inputs(n: int, routing: str, num_experts: int = 3):
    gen = torch.Generator().manual_seed(1)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    core_router = routing == "core"
    x, router_x = t(2, n // 2, 5), (t(2, n // 2, 5) if routing == "input, dropout" else None)
    w = t(num_experts, 4 if core_router else 5)
    return x, t(4, 5), w, t(num_experts, 4, 4), t(6, 4), 1.7, core_router, router_x


@SIZES_AND_SOFTMAX
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


@SIZES_AND_SOFTMAX
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


@SIZES
@ROUTINGS
@pytest.mark.parametrize("num_experts", [3, 7], ids=["E<=r", "E>r"])
@pytest.mark.parametrize("prepared", ["traced", "kept"])
def test_branch_inference_under_compile_matches_eager_float64(
    n: int, routing: str, num_experts: int, prepared: str
) -> None:
    """Traced by ``torch.compile`` (``fullgraph``), few tokens take the fusible form (broadcast products and
    sums), more the matmuls; the weights are laid out inside the graph ("traced") or kept from an eager call
    ("kept": the layout eager chose, e.g. merged cores for E > r). Same numbers as the eager branch."""
    args = tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in _branch_inputs(n, routing, num_experts)
    )
    x, lora_A, w, cores, lora_B, scaling, core_router, router_x = args
    with torch.no_grad():
        d0, p0 = _eager_branch(*args)
    kept = kernels.prepare_inference(lora_A, w, cores, lora_B, scaling, core_router)

    def branch(x, router_x, lora_A, w, cores, lora_B):
        if prepared == "kept":
            weights = kept
        else:
            weights = kernels.prepare_inference(lora_A, w, cores, lora_B, scaling, core_router)
        return kernels.branch_inference(x, weights, router_x)

    torch._dynamo.reset()
    compiled = torch.compile(branch, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        d1, p1 = compiled(x, router_x, lora_A, w, cores, lora_B)
    torch.testing.assert_close(d1, d0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1, p0.to(p1.dtype), rtol=1e-12, atol=1e-12)


def _traced_matmuls(n: int) -> int:
    """Matmuls in the graph ``torch.compile`` traces for the decoding branch on ``n`` tokens (core routing)."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _branch_inputs(6, "core"))
    _, lora_A, w, cores, lora_B, scaling, core_router, _ = args
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(
            lambda x: kernels.branch_inference(
                x, kernels.prepare_inference(lora_A, w, cores, lora_B, scaling, core_router)
            ),
            fullgraph=True,
            backend=backend,
        )(torch.randn(n, 5, dtype=torch.float64))
    return sum(
        node.target in (torch.matmul, torch.ops.aten.mm.default) for gm in graphs for node in gm.graph.nodes
    )


def test_branch_inference_fusible_form_is_what_compile_traces_for_few_tokens(monkeypatch) -> None:
    """The fusible form replaces the small matmuls (router logits, mixing) for decoding sizes only: traced for
    few tokens, the graph holds the matmuls of ``A`` and ``B`` alone; for many tokens, all four; and also where
    tokens x ``E r^2`` exceed ``FUSIBLE_MAX`` (a backend that does not fuse would materialise the products)."""
    assert {n: _traced_matmuls(n) for n in (2, 130)} == {2: 2, 130: 4}
    monkeypatch.setattr(kernels.fused, "FUSIBLE_MAX", 2 * 3 * 4 * 4 - 1)  # 2 tokens, E=3, r=4: one over
    assert _traced_matmuls(2) == 4


@SIZES
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
    options = {"num_experts": 3, **options}
    config = comol.CoMoLConfig(r=4, lora_alpha=8, target_modules=["proj"], init_weights=False, **options)
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


# --- the weights kept for inference (MixtureLayer.inference_weights) ---------------------------------------
def _eval_pair(**options) -> tuple[nn.Module, nn.Module]:
    """The same float64 CoMoL adapter twice, eager (the reference) and fused, both in eval mode."""
    eager, fused = (_model(kernel, **options).double().eval() for kernel in ("eager", "fused"))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _layer(model: nn.Module) -> comol.mixture.MixtureLayer:
    return next(iter(comol.mixture.mixture_layers(model).values()))


def _count_builds(layer: comol.mixture.MixtureLayer, monkeypatch) -> list[int]:
    builds: list[int] = []
    original = layer.inference_weights

    def counting(name, sources, build, settings=()):
        return original(name, sources, lambda *args: builds.append(1) or build(*args), settings)

    monkeypatch.setattr(layer, "inference_weights", counting)
    return builds


INFERENCE_OPTIONS = pytest.mark.parametrize(
    "options", [{}, {"core_router": False}, {"num_experts": 7}], ids=["core", "input", "E>r"]
)


@INFERENCE_OPTIONS
def test_kept_inference_weights_are_built_once_and_follow_in_place_changes(
    options: dict, monkeypatch
) -> None:
    """Without grad in eval mode the fused path lays the weights out once and keeps them; an in-place change of
    any weight (an optimizer step, ``load_state_dict``) is seen through its version counter."""
    eager, fused = _eval_pair(**options)
    builds = _count_builds(_layer(fused), monkeypatch)
    x = torch.randn(3, 4, 16, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(fused(x), eager(x))

    check()
    check()
    with torch.inference_mode():
        fused(x)
    assert len(builds) == 1
    for part in ("comol_A", "comol_router", "comol_B"):  # one weight at a time, in place, still in eval mode
        with torch.no_grad():
            for model in (eager, fused):
                getattr(_layer(model), part)["default"].weight.mul_(1.5)
        check()
    with torch.no_grad():
        for model in (eager, fused):
            _layer(model).comol_cores["default"].add_(0.5)
    check()
    assert len(builds) == 5
    state = {k: v + 0.1 for k, v in eager.state_dict().items()}
    eager.load_state_dict(state)
    fused.load_state_dict(state)
    check()
    assert len(builds) == 6
    for model in (eager, fused):  # the scaling is folded into the kept cores: a new scaling is seen too
        _layer(model).scaling["default"] *= 3.0
    check()
    assert len(builds) == 7


def test_inference_tensors_as_weights_are_used_but_never_kept() -> None:
    """Weights created under ``torch.inference_mode`` have no version counter, so nothing can be kept for them."""
    eager, fused = _eval_pair()
    with torch.inference_mode():
        for model in (eager, fused):
            cores = _layer(model).comol_cores
            cores["default"] = nn.Parameter(cores["default"] * 2.0, requires_grad=False)
        x = torch.randn(2, 16, dtype=torch.float64)
        torch.testing.assert_close(fused(x), eager(x))
        torch.testing.assert_close(fused(x), eager(x))
    assert _layer(fused)._inference_weights == {}


@INFERENCE_OPTIONS
def test_kept_inference_weights_follow_moves_modes_and_new_adapters(options: dict, monkeypatch) -> None:
    """A dtype move, a new adapter under the same name and a round trip through training mode (where nothing
    is kept, and an optimizer step happens) all give the eager result afterwards."""
    eager, fused = _eval_pair(**options)
    layer = _layer(fused)
    builds = _count_builds(layer, monkeypatch)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
    assert layer._inference_weights
    fused.train()  # leaving eval mode drops what was kept
    assert not layer._inference_weights
    for model in (eager, fused):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        model(x).square().sum().backward()
        torch.optim.SGD(params, lr=0.1).step()
    with torch.no_grad():
        fused(x)  # training mode without grad: the branch runs, nothing is kept
    assert not layer._inference_weights
    for model in (eager, fused):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))
        eager.float()
        fused.float()
        torch.testing.assert_close(fused(x.float()), eager(x.float()))
    config = comol.CoMoLConfig(r=4, lora_alpha=8, target_modules=["proj"], init_weights=False, **options)
    for model in (eager, fused):
        model.add_adapter("second", config)
        model.set_adapter("second")
        model.float().eval()
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fused(x.float()), eager(x.float()))
    # built for: the first call, the call in training mode (not kept), float64 after the step, float32, "second"
    assert len(builds) == 5


def test_kept_inference_weights_dropped_with_their_adapter() -> None:
    _, fused = _eval_pair()
    config = comol.CoMoLConfig(r=4, lora_alpha=8, target_modules=["proj"], init_weights=False)
    fused.add_adapter("other", config)
    fused.set_adapter("other")
    fused.double().eval()
    with torch.no_grad():
        fused(torch.randn(2, 16, dtype=torch.float64))
    assert set(_layer(fused)._inference_weights) == {"other"}
    fused.base_model.delete_adapter("other")
    assert not _layer(fused)._inference_weights


def test_register_core_mix_takes_the_inference_pair_together() -> None:
    with pytest.raises(ValueError, match="registered together"):
        kernels.register_core_mix("half", kernels.core_mix_fused, prepare_inference=kernels.prepare_inference)
    assert "half" not in kernels.core_mix_names()


class _LargeCopies(TorchDispatchMode):
    """Records the copies (clone, copy_, contiguous) of tensors with at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy):
            source = args[-1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            if source.numel() >= self.numel:
                self.seen.append((str(func), tuple(source.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("core_router", [True, False])
def test_branch_never_copies_the_mixing_temporary(core_router: bool) -> None:
    """With many tokens and few experts on CPU the softmax is taken transposed (a transposed view of probs);
    the mixing must still build its ``(N, E r)`` outer product in place, forward and backward (a copy of it
    cost as much as the mixing itself)."""
    n, r, num_experts, d = 512, 8, 4, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    weights = [torch.randn(*shape, generator=gen, requires_grad=True)
               for shape in ((r, d), (num_experts, r if core_router else d), (num_experts, r, r), (d, r))]  # fmt: skip
    with _LargeCopies(n * num_experts * r) as copies:
        delta, _ = kernels.comol_branch_fused(
            x, weights[0], weights[1], weights[2], weights[3], 2.0, core_router
        )
        delta.sum().backward()
    assert copies.seen == []


@pytest.mark.parametrize("core_router", [True, False])
def test_inference_weights_copy_only_b_and_the_cores(core_router: bool) -> None:
    """The kept layout costs ``r d_out`` (``B^T``) plus ``E r^2`` (the scaled cores), and ``E d_in`` more for input
    routing's ``[A; W_g]``: ``A`` and the core-space router are read through views of the parameters."""
    r, num_experts, d_in, d_out = 4, 3, 10, 6
    lora_A, lora_B = torch.randn(r, d_in), torch.randn(d_out, r)
    router, cores = torch.randn(num_experts, r if core_router else d_in), torch.randn(num_experts, r, r)
    weights = kernels.prepare_inference(lora_A, router, cores, lora_B, 2.0, core_router)
    parameters = {t.untyped_storage().data_ptr() for t in (lora_A, lora_B, router, cores)}
    shared = {name for name, t in weights._asdict().items() if t.untyped_storage().data_ptr() in parameters}
    assert shared == ({"lora_in", "router_weight"} if core_router else {"router_weight"})
    assert weights.lora_B.shape == (r, d_out) and weights.lora_B.is_contiguous()
    torch.testing.assert_close(weights.lora_B, lora_B.t())


@EXPERTS
def test_branch_keeps_the_codes_token_minor_only_in_the_outer_product_order(num_experts: int) -> None:
    """The branch stores ``z = A x`` tokens last for ``E <= r`` (its mixing's element-wise work then runs along
    the token axis) and tokens first for ``E > r`` (merged cores); either way it keeps ``z`` only once."""
    x, lora_A, w, cores, lora_B, scaling, _, _ = _branch_inputs(80, "core", num_experts)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.comol_branch_fused(x, lora_A, w, cores, lora_B, scaling, True)
    codes = [t for t in saved if t.shape == (80, 4)]
    assert len(codes) == 1
    stored_token_minor = codes[0].t().is_contiguous()
    assert stored_token_minor == (num_experts <= 4) and codes[0].is_contiguous() == (num_experts > 4)


@ROUTINGS
@EXPERTS
def test_branch_backward_takes_saved_tensors_back_in_any_layout(routing: str, num_experts: int) -> None:
    """Saved-tensor hooks that copy what autograd keeps (offloading it, as ``save_on_cpu(pin_memory=True)`` does)
    hand ``z`` back contiguous, tokens first, whatever layout the branch stored it in: same gradients."""
    args = _branch_inputs(80, routing, num_experts)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    expected = torch.autograd.grad(kernels.comol_branch_fused(*args)[0].sum(), tensors)

    def offload(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype).copy_(t)

    with torch.autograd.graph.saved_tensors_hooks(offload, lambda t: t):
        delta, _ = kernels.comol_branch_fused(*args)
    for a, b in zip(torch.autograd.grad(delta.sum(), tensors), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
