"""Post-training pruning (METHOD.md section 5): magnitude, Wanda and SparseGPT.

Conventions
-----------
* Kernels are in the model's layout `[d_in, d_out]` (y = x W). "Per output" means
  per output column j of the kernel, compared over its inputs i.
* A mask is a boolean array shaped like the weight, **True where the weight is
  pruned** (set to zero), as in the Wanda / SparseGPT reference code.
* Sparsity `s` prunes `round(s * n)` weights of a group of `n` candidates exactly
  (ties broken by position, so the count is always exact): the whole matrix for
  magnitude, each output column for Wanda, each block of `blocksize` inputs (all
  outputs) for SparseGPT.
* N:M (`nm=(N, M)`): N zeros in every M consecutive INPUTS of each output; the
  sparsity is then N/M (pass `sparsity=None` or exactly N/M).

`prune_model` prunes every q, k, v, o, gate, up, down matrix with its own sparsity
(model order, as `allocate.layer_sparsities` returns them); calibration activations
are taken block by block through the already-pruned preceding blocks."""

from __future__ import annotations

from .calibration import calibration_ids, calibration_text
from .masks import (
    PRECISION,
    apply_magnitude,
    apply_wanda,
    check_nm,
    check_sparsity,
    check_weight,
    count_zeros,
    lowest_k_cols,
    lowest_k_flat,
    lowest_nm,
    magnitude_mask,
    magnitude_score,
    wanda_mask,
    wanda_score,
)
from .model import (
    DEFAULT_EPSILON,
    METHODS,
    alpha_per_matrix,
    global_sparsity,
    outlier_ratios,
    prune_model,
)
from .sparsegpt import sparsegpt_core, sparsegpt_counts, sparsegpt_prune

__all__ = ["PRECISION", "check_nm", "check_sparsity", "check_weight", "lowest_k_flat",
           "lowest_k_cols", "lowest_nm", "magnitude_score", "wanda_score", "magnitude_mask",
           "wanda_mask", "count_zeros", "apply_magnitude", "apply_wanda", "sparsegpt_counts",
           "sparsegpt_core", "sparsegpt_prune", "METHODS", "DEFAULT_EPSILON", "prune_model",
           "global_sparsity", "outlier_ratios", "alpha_per_matrix", "calibration_text",
           "calibration_ids"]
