"""LoRA-MoE (MoLA style) with a per-layer number of experts (METHOD.md section 4).

For every target linear map of block l there are s_l LoRA experts (A_j [d_in, r],
Gaussian init std 1/r as peft's "gaussian"; B_j [r, d_out] zero), typed
`nnx.LoRAParam`, and a bias-free router W_r [d_in, s_l] typed `RouterParam` (a subclass
of `nnx.Param`, so `nnx.split(m, (nnx.LoRAParam, RouterParam), ...)` — `TRAINABLE` —
separates the trained parameters from the frozen base):

    p   = softmax(x W_r)                      (float32)
    top = the top-k entries of p, renormalised to sum to 1 (k = 2 if s_l > 1 else 1)
    y   = x W0 + sum_{j in top} p_j (alpha/r) (x A_j) B_j

Layers differ in expert count, so the model is not homogeneous and cannot be one
`lax.scan` over stacked blocks like `Decoder`: the blocks run in a Python loop (unrolled
under jit; compile time grows with depth), each from its slice of the base's stacked
arrays, reusing the decoder's helpers.

Expert computation — DENSE over the layer's experts, two GEMMs, no loop:
    U = x [N, d_in] @ A_cat [d_in, s*r]                  (all s expert projections)
    U <- U * (scale * G)  broadcast per (token, expert)  (G [N, s]: the renormalised
                                                          top-k gates, 0 outside top-k)
    delta = U [N, s*r] @ B_cat [s*r, d_out]              (weighted sum over experts is
                                                          the contraction over s*r)
Why: it is exact (the experts outside the top-k get weight exactly 0), it costs the same
as ONE LoRA of rank s*r (s*r is 8..64 against d ~ 500..4096: a few percent of the base
GEMM), it has static shapes and no gather/scatter or token sorting (which on these
sizes costs more than the FLOPs it saves, and is awkward to differentiate), and the
router gradient flows through `lax.top_k`'s values. Gather-based routing (megablocks
style) would only pay off when s*r approaches d.

Optional Switch-style load-balancing loss (coefficient `aux_coef`, default 0 = off):
per MoE linear with s > 1, s * sum_j f_j P_j over real (unmasked) tokens, f_j = share of
top-k slots routed to j, P_j = mean router probability; averaged over those linears."""

from __future__ import annotations

from . import adapter as _adapter, model as _model, train as _train
from .adapter import *  # noqa: F403
from .model import *  # noqa: F403
from .train import *  # noqa: F403

__all__ = [*_adapter.__all__, *_model.__all__, *_train.__all__]
