"""Loading adapters: weights of another method (or other settings) under a comol config are refused with a
clear error instead of peft's missing-keys warning; legitimate loads still work; comol's own loader checks an
adapter directory first; every saved comol adapter's README says that it needs comol."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import set_peft_model_state_dict

import comol
from comol.mixture import AdapterWeightsError, check_adapter_dir
from comol.mixture.loading import CARD_HEADING

from cases import CASES, COMMON, TARGETS
from conftest import randomize_adapter, tiny_model

# One configuration per method, all on the tiny Llama.
FIRST_CASES = list({case.method: case for case in reversed(CASES) if case.family == "llama"}.values())[::-1]
METHOD_IDS = [case.method for case in FIRST_CASES]


def save_method(case, path, seed: int = 0, **overrides) -> None:
    config = comol.build_config(case.method, **{**COMMON, **case.kwargs, **overrides})
    model = get_peft_model(tiny_model(seed=seed), config)
    randomize_adapter(model, seed=seed)
    model.save_pretrained(path)


def save_lora(path) -> None:
    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    randomize_adapter(model)
    model.save_pretrained(path)


def swap(config_dir, weights_dir, out):
    """An adapter directory with the config of one adapter and the weights of another."""
    out.mkdir()
    shutil.copy(config_dir / "adapter_config.json", out / "adapter_config.json")
    shutil.copy(weights_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


@pytest.fixture
def lora_dir(tmp_path):
    save_lora(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.mark.parametrize("case", FIRST_CASES, ids=METHOD_IDS)
def test_lora_weights_under_a_comol_config_are_refused(case, tmp_path, lora_dir):
    save_method(case, tmp_path / "method")
    mixed = swap(tmp_path / "method", lora_dir, tmp_path / "mixed")
    peft_type = case.method.upper()
    with pytest.raises(
        AdapterWeightsError, match=rf"adapter 'default' \({peft_type}\).*not in the weights"
    ) as err:
        PeftModel.from_pretrained(tiny_model(), mixed)
    message = str(err.value)
    assert f"{case.method}_" in message  # names missing tensors of the method
    assert "LORA's tensors" in message and "lora_A" in message  # what the file holds instead
    assert "saved by another method" in message


def test_refused_with_low_cpu_mem_usage_and_as_a_second_adapter(tmp_path, lora_dir):
    case = FIRST_CASES[0]
    save_method(case, tmp_path / "comol")
    mixed = swap(tmp_path / "comol", lora_dir, tmp_path / "mixed")
    with pytest.raises(AdapterWeightsError, match="adapter 'default'"):
        PeftModel.from_pretrained(tiny_model(), mixed, low_cpu_mem_usage=True)
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "comol")
    with pytest.raises(AdapterWeightsError, match="adapter 'second'"):
        model.load_adapter(mixed, adapter_name="second")
    bare = tiny_model()  # layers injected without a PeftModel, as the transformers/diffusers integrations do
    inject_adapter_in_model(model.peft_config["default"], bare, adapter_name="bare")
    with pytest.raises(AdapterWeightsError, match=r"adapter 'bare'.*hold none of this adapter's tensors"):
        set_peft_model_state_dict(bare, {}, adapter_name="bare")


def test_weights_saved_with_other_targets_are_refused(tmp_path):
    case = FIRST_CASES[0]
    save_method(case, tmp_path / "narrow", target_modules=["q_proj", "v_proj"])
    save_method(case, tmp_path / "wide")
    mixed = swap(tmp_path / "wide", tmp_path / "narrow", tmp_path / "mixed")
    with pytest.raises(AdapterWeightsError, match=r"k_proj\.comol_A.*other settings \(target_modules"):
        PeftModel.from_pretrained(tiny_model(), mixed)


def test_a_second_adapter_with_other_targets_loads(tmp_path, input_ids):
    """Only the adapter being loaded is checked: the first one's tensors are absent from the second's file."""
    case = FIRST_CASES[0]
    save_method(case, tmp_path / "first")
    save_method(case, tmp_path / "second", seed=1, target_modules=["q_proj"], layers_to_transform=[1])
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    model.set_adapter("second")
    alone = PeftModel.from_pretrained(tiny_model(), tmp_path / "second")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, alone(input_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", FIRST_CASES, ids=METHOD_IDS)
def test_comol_loader_checks_the_directory(case, tmp_path, lora_dir):
    save_method(case, tmp_path / "method")
    assert check_adapter_dir(tmp_path / "method") == case.method.upper()
    assert check_adapter_dir(lora_dir) == "LORA"
    peft_type = case.method.upper()
    with pytest.raises(ValueError, match=rf"holds LORA's tensors .*says peft_type '{peft_type}'"):
        check_adapter_dir(swap(tmp_path / "method", lora_dir, tmp_path / "mixed"))
    # The reverse: the method's weights under a LoRA config.
    with pytest.raises(ValueError, match=rf"holds {peft_type}'s tensors .*says peft_type 'LORA'"):
        check_adapter_dir(swap(lora_dir, tmp_path / "method", tmp_path / "reverse"))


def test_unknown_peft_type_says_pip_install_and_import_comol(tmp_path):
    save_method(FIRST_CASES[0], tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = "NEWERLORA"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'NEWERLORA'.*`pip install comol` and `import comol`"):
        check_adapter_dir(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        check_adapter_dir(tmp_path)


def test_evaluation_loader_checks_before_loading_the_model(tmp_path):
    from comol.evaluation.generation import load_model

    save_method(FIRST_CASES[0], tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"COMOL"', '"NEWERLORA"'))
    # The model path does not exist: the adapter is refused before the model would be loaded.
    with pytest.raises(ValueError, match="`pip install comol` and `import comol`"):
        load_model(str(tmp_path / "no-such-model"), adapter=str(tmp_path / "adapter"))


@pytest.mark.parametrize("case", FIRST_CASES, ids=METHOD_IDS)
def test_saved_card_says_the_adapter_needs_comol(case, tmp_path):
    config = comol.build_config(case.method, **{**COMMON, **case.kwargs})
    model = get_peft_model(tiny_model(), config)
    model.add_adapter("other", comol.build_config(case.method, **{**COMMON, **case.kwargs}))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again keeps one note
    for directory in (tmp_path, tmp_path / "other"):
        card = (directory / "README.md").read_text()
        assert card.count(CARD_HEADING) == 1, directory
        assert "pip install comol" in card and "import comol" in card
        assert "PeftModel.from_pretrained" in card and f"KeyError: '{case.method.upper()}'" in card
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card  # peft's card is kept
    assert "- PEFT " in card


def test_cli_refuses_a_mismatched_adapter_with_exit_2(tmp_path, lora_dir, capsys):
    """``comol decompose`` checks its --adapter before loading the base model (which does not exist here)."""
    from comol.cli import main as cli_main

    save_method(FIRST_CASES[0], tmp_path / "comol")
    mixed = swap(tmp_path / "comol", lora_dir, tmp_path / "mixed")
    args = ["decompose", "--adapter", str(mixed), "--out", str(tmp_path / "out")]
    assert cli_main([*args, "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "holds LORA's tensors" in err and "Traceback" not in err
