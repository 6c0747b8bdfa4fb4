"""Every method on bitsandbytes-quantized bases (QLoRA): nf4 / fp4 ``Linear4bit`` and ``Linear8bitLt``.

bitsandbytes 0.50 runs all three on CPU, so these tests run everywhere; with CUDA the training round trip
runs on the GPU as well. The tiny models here are wider than ``tests/conftest.py``'s (hidden 64): bnb's
4-bit blocks are 64 values, and its CPU inference kernel needs ``out_features`` divisible by 32.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.integrations import dequantize_bnb_weight
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import comol
from comol.methods import build_config
from comol.mixture import MergeNotSupportedError, collect_aux_loss, mixture_layers

from cases import CASES, COMMON, Case
from conftest import VOCAB, randomize_adapter, tiny_config

bnb = pytest.importorskip("bitsandbytes")

QUANTIZATIONS = ["nf4", "fp4", "int8"]
QUANT_CASES = [case for case in CASES if case.family != "gpt2"]  # bnb replaces nn.Linear layers
IDS = [case.id for case in QUANT_CASES]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A saved float32 tiny model per family (hidden 64, head_dim 16), to be loaded quantized."""
    paths = {}
    for family in ("llama", "qwen3"):
        config = tiny_config(family)
        config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        paths[family] = str(path)
    return paths


def quantization_config(quantization: str) -> BitsAndBytesConfig:
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=torch.float32
    )


def quantized(path: str, quantization: str, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint freshly quantized, in eval mode.

    On CPUs with AVX512-BF16, bnb repacks 4-bit weights for a bfloat16 kernel at the first no-grad eval
    forward; that is turned off so that results do not depend on the machine (it computes in float32).
    """
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization_config(quantization), device_map=device
    )
    return portable(model).eval()


def portable(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bnb's machine-dependent CPU repacking of 4-bit weights (see :func:`quantized`)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def dequantized(path: str, quantized_model: torch.nn.Module) -> torch.nn.Module:
    """The float model whose linear weights are exactly the dequantized weights of ``quantized_model``."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for name, module in quantized_model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                state = getattr(module, "state", None)
                weight = dequantize_bnb_weight(module.weight, state=state)
                model.get_submodule(name.replace(".base_layer", "")).weight.copy_(weight.float().cpu())
    return model


def config_of(case: Case):
    return build_config(case.method, **{**COMMON, **case.kwargs})


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefix = model.base_model.prefix
    return {key: value for key, value in model.state_dict().items() if prefix in key}


def twins(path: str, case: Case, quantization: str):
    """(adapter on the quantized base, the same adapter on the dequantized base), random adapter weights."""
    q_model = get_peft_model(quantized(path, quantization), config_of(case))
    randomize_adapter(q_model)
    f_model = get_peft_model(dequantized(path, q_model.get_base_model()), config_of(case))
    state = adapter_state(q_model)
    missing = set(adapter_state(f_model)) - set(state)
    assert not missing
    f_model.load_state_dict(state, strict=False)
    return q_model, f_model


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return (
            model(**{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            .logits.float()
            .cpu()
        )


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=IDS)
def test_quantized_base_matches_dequantized_base(case, quantization, checkpoints, batch):
    q_model, f_model = twins(checkpoints[case.family], case, quantization)
    assert all(
        isinstance(layer.get_base_layer(), bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
        for layer in mixture_layers(q_model).values()
    )
    expected = logits(f_model, batch)
    with f_model.disable_adapter():
        effect = (expected - logits(f_model, batch)).abs().max()
    assert effect > 0.1  # the adapter changes the output, so a wrong adapter would show
    got = logits(q_model, batch)
    if quantization == "int8":  # Linear8bitLt also quantizes the activations (up to ~7% of the effect here)
        assert (got - expected).abs().max() < 0.2 * effect
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=IDS)
def test_qlora_training_and_exact_reload(case, quantization, device, checkpoints, batch, tmp_path):
    path = checkpoints[case.family]
    base = prepare_model_for_kbit_training(
        quantized(path, quantization, device),
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config_of(case))
    randomize_adapter(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(model.base_model.prefix in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    for _ in range(2):
        out = model(**batch, labels=batch["input_ids"])
        aux = collect_aux_loss(model)
        loss = out.loss if aux is None else out.loss + aux
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())
    for key, value in model.get_base_model().state_dict().items():
        if key in frozen:  # the quantized base (and everything outside the adapter) is untouched
            assert torch.equal(value, frozen[key]), key
    model.eval()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantized(path, quantization, device), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=IDS)
def test_export_lora_from_quantized_base(case, quantization, checkpoints, batch, tmp_path):
    """Exporting works (or is refused) exactly as on a float base, and the LoRA runs on a quantized base."""
    path = checkpoints[case.family]
    q_model, f_model = twins(path, case, quantization)
    try:
        gates = comol.calibrate_gates(f_model, [batch])
    except ValueError:  # a method without a router
        gates = None
    try:
        comol.export_lora(f_model, tmp_path / "float", gates=gates)
    except (MergeNotSupportedError, KeyError) as error:  # a method that cannot be exported
        with pytest.raises(type(error)):
            comol.export_lora(q_model, tmp_path / "quantized", gates=gates)
        return
    comol.export_lora(q_model, tmp_path / "quantized", gates=gates)
    on_float = PeftModel.from_pretrained(dequantized(path, q_model.get_base_model()), tmp_path / "float")
    on_quantized = PeftModel.from_pretrained(quantized(path, quantization), tmp_path / "quantized")
    assert type(on_quantized.base_model.model.model.layers[0].self_attn.q_proj).__module__.endswith("bnb")
    expected = logits(on_float.eval(), batch)
    if quantization == "int8":
        assert torch.isfinite(logits(on_quantized, batch)).all()
    else:
        torch.testing.assert_close(logits(on_quantized.eval(), batch), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_adapter_dtype_of_a_quantized_base_is_a_float_dtype(quantization, checkpoints):
    model = get_peft_model(quantized(checkpoints["llama"], quantization), config_of(QUANT_CASES[0]))
    layer = next(iter(mixture_layers(model).values()))
    assert not layer.get_base_layer().weight.dtype.is_floating_point
    assert layer.adapter_dtype("default") == torch.float32
    assert layer.adapter_dtype("not-created-yet") == torch.float32  # not the uint8 / int8 storage dtype


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_merge_into_quantized_base_is_refused(quantization, checkpoints, batch):
    case = next(case for case in CASES if case.id == "molora-one-expert")  # mergeable on a float base
    model, _ = twins(checkpoints["llama"], case, quantization)
    expected = logits(model, batch)
    stored = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(MergeNotSupportedError, match=r"quantized .*Load the base model unquantized"):
        model.merge_and_unload()
    layer = next(iter(mixture_layers(model).values()))
    with pytest.raises(MergeNotSupportedError, match="quantized"):
        layer.merge()
    assert not layer.merged
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, stored[key]), key
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    with model.disable_adapter():
        base_logits = logits(model, batch)
    unloaded = model.unload()  # removing the adapter needs no full weights
    torch.testing.assert_close(logits(unloaded, batch), base_logits, rtol=0, atol=0)


def test_load_causal_lm_quantizes_and_refuses_gguf(checkpoints):
    from comol import loading
    from comol.training.config import load_config

    model = loading.load_causal_lm(checkpoints["llama"], dtype="fp32", quantization="nf4", device="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert q_proj.compute_dtype == torch.float32
    model = loading.load_causal_lm(checkpoints["llama"], dtype="fp32", quantization="int8", device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    required = ["model.name_or_path=m", "data.train=d.json"]
    assert load_config(None, [*required, "model.quantization=NF4"]).model.quantization == "nf4"
    with pytest.raises(ValueError, match=r"model\.quantization must be one of none, nf4, fp4, int8"):
        load_config(None, [*required, "model.quantization=int4"])
    with pytest.raises(ValueError, match=r"model\.quantization .*GGUF"):
        load_config(None, [*required, "model.quantization=nf4", "model.gguf_file=m.gguf"])


@pytest.mark.slow
def test_comol_train_on_an_nf4_base_trains_and_reloads(tmp_path):
    from tests.training.tiny import make_char_tokenizer, tiny_overrides

    from comol.data.arithmetic import generate
    from comol.training.config import load_config
    from comol.training.run import train

    tokenizer = make_char_tokenizer()
    config = tiny_config("llama")
    config.vocab_size, config.hidden_size, config.intermediate_size = len(tokenizer), 64, 128
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 0
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(generate(32, seed=1)))
    overrides = tiny_overrides(
        model_dir,
        data,
        tmp_path / "run",
        **{
            "adapter.method": "comol",
            "adapter.options.num_experts": 2,
            "model.quantization": "nf4",
            "model.compute_dtype": "fp32",
            "train.gradient_checkpointing": True,
            "train.max_steps": 2,
            "train.save_steps": 2,
        },
    )
    result = train(load_config(None, overrides))
    trained = result.model
    q_proj = trained.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.get_base_layer(), bnb.nn.Linear4bit)
    assert trained.get_base_model().is_gradient_checkpointing
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    portable(trained).eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    expected = logits(trained, batch)
    base = portable(load_config(result.output_dir / "config.yaml").model.load_model())  # quantized as trained
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)


def test_readme_qlora_memory_table_is_what_the_script_prints(capsys):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("qlora_memory", root / "benchmarks" / "qlora_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = str(root / "configs" / "math14k" / "qwen3-8b" / "comol.yaml")
    assert script.main([config, "--preset", "qwen3-8b"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    readme = (root / "README.md").read_text()
    assert len(table) == 9 and all(line in readme for line in table), (
        "README's QLoRA memory table is stale: rerun benchmarks/qlora_memory.py"
    )
    result = script.estimate(config, "qwen3-8b", ["model.quantization=nf4"])
    assert result["trainable_params"] == 25_164_288  # the CoMoL run's count (comol params)
    assert result["bytes"]["quantized base weights"] == pytest.approx(
        result["quantized_weights"] * (0.5 + (1 + 4 / 256) / 64)
    )


# Not int8: LLM.int8's outlier columns (|x| > llm_int8_threshold) are chosen over the whole batch, so a row's
# base output depends on the other rows' hidden states (with llm_int8_threshold=0 the rows are independent and
# this test passes for int8 too).
@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_mixed_adapter_batch_on_a_quantized_base(quantization, checkpoints, batch):
    case = QUANT_CASES[0]
    model = get_peft_model(
        quantized(checkpoints[case.family], quantization), config_of(case), adapter_name="a"
    )
    model.add_adapter("b", config_of(case))
    for seed, name in enumerate(("a", "b")):
        model.set_adapter(name)
        randomize_adapter(model, seed=seed)
    model.eval()
    names = ["b", "__base__"]
    mixed = logits(model, {**batch, "adapter_names": names})
    model.set_adapter("b")
    torch.testing.assert_close(mixed[0], logits(model, batch)[0], rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[1], logits(model, batch)[1], rtol=1e-5, atol=1e-5)
