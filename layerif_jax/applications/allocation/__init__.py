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

from .alpha import pl_alpha_hill
from .common import as_vector, block_means
from .experts import (
    MOLA_PRESETS,
    alphalora_experts,
    check_total,
    expert_counts,
    mola_experts,
    top_k_per_layer,
    uniform_experts,
)
from .metrics import METRICS, read_metric
from .sparsity import (
    SCHEMES,
    check_sparsity_args,
    layer_sparsities,
    owl_sparsities,
    sparsity_ratios,
)

__all__ = ["as_vector", "block_means", "MOLA_PRESETS", "check_total", "expert_counts",
           "top_k_per_layer", "uniform_experts", "mola_experts", "alphalora_experts",
           "SCHEMES", "check_sparsity_args", "sparsity_ratios", "owl_sparsities",
           "layer_sparsities", "pl_alpha_hill", "METRICS", "read_metric"]
