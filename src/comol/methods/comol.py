"""CoMoL: Core-Space Mixture of LoRA (Cao et al., 2026, arXiv 2603.00573).

One LoRA pair ``A (r x d_in)``, ``B (d_out x r)`` shared by all experts; expert ``e`` is only an
``r x r`` core ``M_e``. For every token (paper Eq. 13-15)::

    z = A dropout(x)                                   # (..., r)
    g = softmax(W_g z)        core-space routing       # W_g: (E, r)
    g = softmax(W_g x)        input routing ("w/o CR") # W_g: (E, d_in)
    h = W x + (alpha / r) * B (sum_e g_e M_e) z

The mixture is applied to ``z`` directly (``comol.kernels.core_mix``): no per-token ``r x r`` matrix is
ever built. Trainable parameters per layer: ``r (d_in + d_out) + E r^2 + E (r or d_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comol import kernels
from comol.mixture import MixtureLayer, MixtureModel, RoutedMixtureConfig, register_method
from comol.mixture.init import init_lora_pair_, kaiming_linear_
from comol.mixture.registration import ComolPeftType

INIT_CORES = ("kaiming", "identity", "orthogonal")


@dataclass
class CoMoLConfig(RoutedMixtureConfig):
    """Configuration of a CoMoL adapter.

    Example:
        >>> import comol
        >>> from peft import get_peft_model
        >>> config = comol.CoMoLConfig(r=16, lora_alpha=16, num_experts=8)  # doctest: +SKIP
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    """

    core_router: bool = field(
        default=True,
        metadata={
            "help": "Route on the low-rank code z = A x (core-space routing, router E x r). False: route on the "
            "input x (the paper's 'CoMoL w/o CR', router E x d_in)."
        },
    )
    init_cores: str = field(
        default="kaiming",
        metadata={
            "help": "Initialisation of the expert cores: 'kaiming' (uniform, as nn.Linear; the authors' setup), "
            "'identity' (every core = I, so the adapter starts as plain LoRA) or 'orthogonal'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ComolPeftType.COMOL
        if self.init_cores not in INIT_CORES:
            raise ValueError(f"init_cores must be one of {INIT_CORES}, got {self.init_cores!r}.")


class CoMoLLayer(MixtureLayer):
    """CoMoL adapter layer. Per adapter: ``comol_A``, ``comol_B``, ``comol_router`` (``nn.Linear``) and
    ``comol_cores`` (``nn.Parameter (E, r, r)``, ``M_e[out, in]``, so expert e's update is ``B M_e A``)."""

    prefix = "comol_"
    module_parts = ("A", "B", "router")
    param_parts = ("cores",)

    def create_adapter(self, adapter_name: str, config: CoMoLConfig) -> None:
        r, num_experts = config.r, config.num_experts
        self.comol_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.comol_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.comol_cores[adapter_name] = nn.Parameter(torch.empty(num_experts, r, r))
        router_in = r if config.core_router else self.in_features
        self.comol_router[adapter_name] = nn.Linear(router_in, num_experts, bias=False)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: CoMoLConfig) -> None:
        init_lora_pair_(
            self.comol_A[adapter_name].weight, self.comol_B[adapter_name].weight, zero_B=config.init_weights
        )
        cores = self.comol_cores[adapter_name]
        for core in cores:
            if config.init_cores == "identity":
                core.copy_(torch.eye(config.r))
            elif config.init_cores == "orthogonal":
                nn.init.orthogonal_(core)
            else:
                kaiming_linear_(core)
        self.comol_router[adapter_name].reset_parameters()

    def route(self, adapter_name: str, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gates ``(..., E)`` (dtype of ``z``) for input ``x (..., d_in)`` with codes ``z (..., r)``."""
        routed = z if self.adapter_config[adapter_name].core_router else x
        logits = self.comol_router[adapter_name](routed)  # (..., E)
        return self.gates_from_logits(adapter_name, logits, routed).to(z.dtype)

    def implementation_names(self) -> list[str]:
        return kernels.core_mix_names()

    def resolve_implementation(self, name: str, x: torch.Tensor) -> kernels.CoreMixImplementation:
        return kernels.get_core_mix(name, x)

    def adapter_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., d_out)``: ``(alpha/r) B (sum_e g_e M_e) A dropout(x)``."""
        impl: kernels.CoreMixImplementation = self.implementation_for(x)
        config: CoMoLConfig = self.adapter_config[adapter_name]
        # The containers' own dicts, read directly: nn.Module.__getattr__ and the containers' __getitem__ are
        # Python calls that a decoding step pays per layer (ZeRO-3's gathering _parameters mapping still applies).
        modules = self._modules
        lora_A, lora_B = modules["comol_A"]._modules[adapter_name], modules["comol_B"]._modules[adapter_name]
        router = modules["comol_router"]._modules[adapter_name]
        # FSDP1 takes parameters off _parameters during forward, setting views of its flat parameter as attributes
        core_params = modules["comol_cores"]._parameters
        cores = (
            core_params[adapter_name] if adapter_name in core_params else modules["comol_cores"][adapter_name]
        )
        router_weight = (
            _plain_weight(router)
            if impl.routed is not None
            and config.router_top_k is None
            and not (config.aux_loss_coef > 0 and self.training)  # the balancing loss needs probs' graph
            else None
        )
        dropout = modules["adapter_dropout"]._modules[adapter_name]
        x_in = x if type(dropout) is nn.Identity else dropout(x)  # (..., d_in)
        if router_weight is not None and impl.branch is not None:
            weight_A, weight_B = _plain_weight(lora_A), _plain_weight(lora_B)
            if weight_A is not None and weight_B is not None:
                router_x = None if config.core_router or x_in is x else x
                sources = (weight_A, router_weight, cores, weight_B)
                if impl.branch_inference is not None and (
                    not torch.is_grad_enabled()
                    or not (x.requires_grad or any(t.requires_grad for t in sources))
                ):  # inference (decoding): weights laid out once, kept between steps
                    weights = self.inference_weights(
                        adapter_name,
                        sources,
                        impl.prepare_inference,
                        (self.scaling[adapter_name], config.core_router),
                    )
                    delta, probs = impl.branch_inference(x_in, weights, router_x)
                else:  # the whole branch (A, router, softmax, mixing, B, scaling) in one autograd node
                    delta, probs = impl.branch(
                        x_in, weight_A, router_weight, cores, weight_B, self.scaling[adapter_name],
                        config.core_router, router_x,
                    )  # fmt: skip
                if self._gate_hooks:
                    self.observe_routing(adapter_name, probs, probs)
                return delta
        z = lora_A(x_in)  # (..., r)
        if router_weight is not None:  # router, float32 softmax and mixing in one kernel
            mixed, probs = impl.routed(
                z, z if config.core_router else x, router_weight, cores
            )  # (..., r), (..., E)
            if self._gate_hooks:
                self.observe_routing(adapter_name, probs, probs)
        else:
            gates = self.route(adapter_name, x, z)  # (..., E)
            mixed = impl.core_mix(z, gates, cores)  # (..., r)
        return lora_B(mixed) * self.scaling[adapter_name]

    def fixed_gate_lora(
        self, adapter_name: str, gates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cores = self.comol_cores[adapter_name]  # (E, r, r)
        gates = self.check_fixed_gates(adapter_name, gates, cores.shape[0])
        merged_core = torch.einsum("e,eoi->oi", gates.to(cores), cores)  # (r, r)
        a = self.comol_A[adapter_name].weight  # (r, d_in)
        b = self.comol_B[adapter_name].weight @ merged_core * self.scaling[adapter_name]  # (d_out, r)
        return a, b


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """``module``'s weight if the fast path may read it directly instead of calling the module, else None.

    That is a bias-free ``nn.Linear`` whose weight is materialised with its full ``(out, in)`` shape. A router
    wrapped as its own FSDP1 unit (peft's FSDP auto-wrap policy does that) is not an ``nn.Linear`` and its
    weight is a flat shard outside its forward; a ZeRO-3 partitioned weight is an empty placeholder. Those
    go through the module's forward, which gathers the weight.
    """
    if type(module) is not nn.Linear:
        return None
    # Read through _parameters[...] (not nn.Module.__getattr__, slow on the decoding hot path, nor dict.get):
    # DeepSpeed ZeRO-3 replaces _parameters by a mapping whose __getitem__ gathers a partitioned parameter.
    parameters = module._parameters
    if "weight" not in parameters or ("bias" in parameters and parameters["bias"] is not None):
        return None
    weight = parameters["weight"]
    if weight is None or weight.shape != (module.out_features, module.in_features):
        return None
    return weight


class CoMoLModel(MixtureModel):
    """peft tuner for CoMoL (use through ``peft.get_peft_model(model, CoMoLConfig(...))``)."""

    prefix = "comol_"
    tuner_layer_cls = CoMoLLayer


register_method("comol", CoMoLConfig, CoMoLModel)
