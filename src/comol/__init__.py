"""comol: Core-Space Mixture of LoRA (CoMoL) and its baselines as native peft adapters.

``import comol`` registers every method with peft, so ``get_peft_model``, ``PeftModel.from_pretrained``
and transformers' ``model.load_adapter`` work with comol adapters.
"""

from comol.composition import CompositionError, compose_loras, decompose
from comol.export import calibrate_gates, export_lora

# importing comol.methods imports, and so registers, every method
from comol.methods import build_config, get_config_class, method_names
from comol.methods.comol import CoMoLConfig, CoMoLLayer, CoMoLModel
from comol.mixture import MergeNotSupportedError, RouterStats, collect_aux_loss

__version__ = "0.1.0"

__all__ = [
    "CoMoLConfig",
    "CoMoLLayer",
    "CoMoLModel",
    "CompositionError",
    "MergeNotSupportedError",
    "RouterStats",
    "__version__",
    "build_config",
    "calibrate_gates",
    "collect_aux_loss",
    "compose_loras",
    "decompose",
    "export_lora",
    "get_config_class",
    "method_names",
]
