"""Implementations of CoMoL's core mixing, behind a small registry (:mod:`comol.kernels.registry`).

The operation: for each token, mix the expert cores with the token's gates and apply the result to the
token's low-rank code, without ever forming a per-token ``r x r`` matrix::

    m[..., o] = sum_e gates[..., e] * sum_i cores[e, o, i] * z[..., i]

Shapes: ``z (..., r)``, ``gates (..., E)``, ``cores (E, r, r)`` with ``cores[e]`` laid out like a Linear
weight ``[out, in]``; result ``(..., r)``.

- :mod:`~comol.kernels.registry`: names -> implementations, ``"auto"`` resolution.
- :mod:`~comol.kernels.eager`: the reference (``"eager"``) and the naive per-token cores (``"stacked"``).
- :mod:`~comol.kernels.fused`: ``autograd.Function`` s with hand-written backward (``"fused"``) and its decoding
  path (weights laid out once, :func:`prepare_inference` / :func:`branch_inference`).
- :mod:`~comol.kernels.triton_core_mix`: Triton kernels for CUDA (``"triton"``).
"""

from comol.kernels.eager import core_mix_eager, core_mix_stacked, routed_core_mix_eager
from comol.kernels.fused import (
    InferenceWeights,
    branch_inference,
    comol_branch_fused,
    core_mix_fused,
    prepare_inference,
    routed_core_mix_fused,
)
from comol.kernels.registry import (
    CoreMixImplementation,
    check_core_mix_name,
    core_mix,
    core_mix_available,
    core_mix_names,
    get_core_mix,
    register_core_mix,
    resolve_core_mix,
    routed_core_mix,
)

__all__ = [
    "CoreMixImplementation",
    "InferenceWeights",
    "branch_inference",
    "check_core_mix_name",
    "comol_branch_fused",
    "core_mix",
    "core_mix_available",
    "core_mix_eager",
    "core_mix_fused",
    "core_mix_names",
    "core_mix_stacked",
    "get_core_mix",
    "prepare_inference",
    "register_core_mix",
    "resolve_core_mix",
    "routed_core_mix",
    "routed_core_mix_eager",
    "routed_core_mix_fused",
]
