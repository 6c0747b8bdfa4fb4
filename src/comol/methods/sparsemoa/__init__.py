"""SparseMoA: a heterogeneous mixture of adapters with sparse, threshold-gated routing (Cao et al., 2025,
"MoA: Heterogeneous Mixture of Adapters for Parameter-Efficient Fine-Tuning of LLMs", arXiv 2506.05928).

Unlike the other methods, SparseMoA routes once per decoder block, not once per linear layer, and its
experts differ in structure: one LoRA on every adapted linear layer of the block (q, k, v, o, down by
default) and one parallel adapter beside the block's MLP. One router per block reads the input ``u`` of
its attention module (the normalised block input) and gates all ``E`` experts with independent sigmoids;
an expert whose gate falls below a token-dependent threshold is skipped for that token::

    p = sigmoid(W_3 (silu(W_1 u + b_1) * (W_2 u + b_2)) + b_3)   # (..., E) float32, SwiGLU router
    tau = tau_max * sigmoid(w_tau . u + b_tau)                    # (..., 1), tau_max = 0.5
    g_e = p_e [p_e >= tau]                                        # Soft MoA (sparse=False): g_e = p_e
    linear e:          h = W x + g_e (alpha / r) B_e A_e dropout(x)
    parallel adapter:  y = mlp(v) + g_E (U silu(D v + d) + u_b)   # v: the MLP's input, D: (a, d)

``E`` = adapted linear layers in the block + 1 (the parallel adapter). The router's hidden width is
``router_hidden_factor * E`` (4 E in MoA's setting; 0 gives a linear router ``d -> E``).

The indicator ``[p_e >= tau]`` has no gradient, so the threshold network only decides which experts run;
as in the MoA authors' implementation its parameters are trainable but receive a zero gradient (they are
kept in the autograd graph so that DDP and FSDP see every trainable parameter used). The CoMoL paper counts
them in its "Param" column: with r = 8, a = 16 and the paper's targets this module gives 24.49M (Qwen3-8B)
and 34.50M (Qwen3-14B), its Tables 2 and 3.

Experts are computed densely and multiplied by their gate (zero for skipped tokens): with rank-8 LoRA
experts the gather/scatter of a token-sparse dispatch costs more than it saves, and the result is the same.

Initialisation: LoRA ``A`` Kaiming-uniform and ``B = 0``, the parallel adapter's down projection
Kaiming-uniform and its up projection zero (so the adapted model starts as the base model; MoA's reference
code instead starts both projections at Xavier with gain 1e-4, i.e. almost zero), router biases zero.

Trainable parameters per decoder block: ``sum_e r (d_in,e + d_out,e)`` (LoRA experts) ``+ 2 d a + a + d``
(parallel adapter) ``+ 2 (d H + H) + H E + E`` (router, ``H = factor E``) ``+ d + 1`` (threshold).
"""

from comol.methods.sparsemoa.block import BLOCK_ATTR, BlockGates, SparseMoABlock, block_key
from comol.methods.sparsemoa.config import SparseMoAConfig
from comol.methods.sparsemoa.layer import SparseMoALayer
from comol.methods.sparsemoa.model import SparseMoAModel
from comol.mixture import register_method

__all__ = [
    "BLOCK_ATTR",
    "BlockGates",
    "SparseMoABlock",
    "SparseMoAConfig",
    "SparseMoALayer",
    "SparseMoAModel",
    "block_key",
]

register_method("sparsemoa", SparseMoAConfig, SparseMoAModel)
