"""``comol train`` from a composed adapter: adapter.init_from and adapter.trainable (router only, + cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import comol
from comol.training.config import load_config
from comol.training.run import train

from .tiny import tiny_overrides


@pytest.fixture(scope="module")
def composed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("composed")
    loras = []
    for e, r in enumerate((2, 3)):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=r, target_modules=["q_proj", "v_proj"]),
        )
        gen = torch.Generator().manual_seed(e)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        model.save_pretrained(str(root / f"lora{e}"))
        loras.append(root / f"lora{e}")
    model = comol.compose_loras(AutoModelForCausalLM.from_pretrained(tiny_model_dir), loras)
    model.save_pretrained(str(root / "composed"))
    return root / "composed"


def _parts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{part: {key: tensor}}`` of a saved comol adapter, parts A, B, cores, router."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path / "adapter_model.safetensors").items():
        out.setdefault(key.split("comol_")[1].split(".")[0], {})[key] = tensor
    return out


@pytest.mark.parametrize(
    ("trainable", "changed"), [("router", {"router"}), ("router+cores", {"router", "cores"})]
)
def test_training_only_the_router_of_a_composed_adapter(
    trainable: str,
    changed: set[str],
    composed_dir: Path,
    tiny_model_dir: Path,
    arithmetic_file: Path,
    tmp_path: Path,
) -> None:
    extra = {
        "adapter.method": "comol",
        "adapter.r": 5,
        "adapter.init_from": str(composed_dir),
        "adapter.trainable": trainable,
        "train.max_steps": 2,
    }
    result = train(
        load_config(None, tiny_overrides(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))
    )
    before, after = _parts(composed_dir), _parts(result.adapter_dir)
    assert set(before) == {"A", "B", "cores", "router"}
    for part, tensors in before.items():
        moved = any(not torch.equal(t, after[part][k]) for k, t in tensors.items())
        assert moved == (part in changed), part


def test_init_from_and_trainable_are_checked(
    composed_dir: Path, tiny_model_dir: Path, arithmetic_file: Path, tmp_path
) -> None:
    def config(**extra):
        return load_config(None, tiny_overrides(tiny_model_dir, arithmetic_file, tmp_path / "run", **extra))

    with pytest.raises(ValueError, match=r"adapter\.trainable must be one of"):
        config(**{"adapter.trainable": "cores"})
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        config(**{"adapter.init_from": str(tmp_path)})
    with pytest.raises(
        ValueError, match=r"remove adapter.method, adapter.r"
    ):  # the tiny run asks for lora, r=4
        config(**{"adapter.init_from": str(composed_dir)})
    with pytest.raises(ValueError, match="no parameters of that kind"):
        train(config(**{"adapter.trainable": "router"}))  # plain LoRA has no router
