"""Turn layer scores into per-layer budgets (METHOD.md sections 4 and 5).

Pure numpy/scipy in float64; nothing here needs jax.

Experts per layer for LoRA-MoE (section 4):
    `expert_counts` (LayerIF), `uniform_experts`, `mola_experts`,
    `alphalora_experts`, and `top_k_per_layer`.
Sparsity per prunable matrix (section 5):
    `sparsity_ratios` (LayerIF), `owl_sparsities`, `pl_alpha_hill`, and the
    dispatcher `layer_sparsities` over "layerif", "reversed", "uniform",
    "alphapruning" and "owl".

Per-matrix vectors are in model order: block 0's q, k, v, o, gate, up, down,
then block 1's, and so on (`per_block` matrices per block, 7 by default)."""

from __future__ import annotations

from . import alpha as _alpha, common as _common, experts as _experts, metrics as _metrics, sparsity as _sparsity
from .alpha import *  # noqa: F403
from .common import *  # noqa: F403
from .experts import *  # noqa: F403
from .metrics import *  # noqa: F403
from .sparsity import *  # noqa: F403

__all__ = [*_alpha.__all__, *_common.__all__, *_experts.__all__, *_metrics.__all__, *_sparsity.__all__]
