"""Build a CoMoL adapter from a library of trained LoRAs (core-space composition), and take one apart.

Per adapted module, for LoRAs ``e = 1..E`` with ``A_e (r_e x d_in)``, ``B_e (d_out x r_e)`` and scaling ``s_e``
(``alpha / r_e``, or ``alpha / sqrt(r_e)`` with rsLoRA), so that ``dW_e = s_e B_e A_e``:

* stack ``A = [A_1; ...; A_E]`` (``R0 x d_in``, ``R0 = sum_e r_e``) and ``B = [s_1 B_1, ..., s_E B_E]``
  (``d_out x R0``);
* orthonormal bases from thin SVDs ``A = U_A S_A V_A^T`` and ``B = U_B S_B V_B^T``; the CoMoL adapter's shared
  ``A := V_A^T`` (``R x d_in``) and ``B := U_B`` (``d_out x R``);
* the core of expert ``e``: ``M_e = U_B^T dW_e V_A = (U_B^T s_e B_e) (A_e V_A)`` (``R x R``), so that
  ``U_B M_e V_A^T = dW_e``.

At ``R >= rank`` of both stacks this is exact: gated one-hot to expert ``e``, the layer *is* LoRA ``e``. With a
smaller ``R`` the leading singular directions of each stack are kept, and the relative error
``||dW_e - U_B' M_e' V_A'^T||_F / ||dW_e||_F`` is the norm of the core entries that fall outside the kept
``R x R`` block (the full bases represent ``dW_e`` exactly and are orthonormal). No ``d_out x d_in`` matrix is
ever formed. A module that a LoRA does not adapt gets a zero core for it; modules have ``R`` rows padded with
zeros where their stacks have smaller rank. The composed adapter has ``lora_alpha = r`` (scaling 1): each
LoRA's scaling is folded into its cores.

The reverse, :func:`decompose`, writes expert ``e`` of a mixture adapter as the standalone LoRA ``B M_e A``
(through the layer's ``fixed_gate_lora`` with a one-hot gate), optionally at a lower rank by an exact
truncated SVD of that product.
"""

from comol.composition.core_space import (
    ROUTER_INITS,
    ComposedModule,
    CompositionReport,
    arrow_router,
    compose_loras,
    compose_module,
    stack_rank,
)
from comol.composition.decompose import LoraAdapter, decompose, truncate_lora
from comol.composition.loras import (
    CompositionError,
    LoraFactors,
    check_base_shapes,
    check_lora_config,
    read_lora,
)

__all__ = [
    "ROUTER_INITS",
    "ComposedModule",
    "CompositionError",
    "CompositionReport",
    "LoraAdapter",
    "LoraFactors",
    "arrow_router",
    "check_base_shapes",
    "check_lora_config",
    "compose_loras",
    "compose_module",
    "decompose",
    "read_lora",
    "stack_rank",
    "truncate_lora",
]
