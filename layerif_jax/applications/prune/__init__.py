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

from . import calibration as _calibration, masks as _masks, methods as _methods, model as _model
from .calibration import *  # noqa: F403
from .masks import *  # noqa: F403
from .methods import *  # noqa: F403
from .methods.sparsegpt import sparsegpt_core, sparsegpt_counts, sparsegpt_prune
from .model import *  # noqa: F403

__all__ = [*_calibration.__all__, *_masks.__all__, *_methods.__all__, *_model.__all__,
           "sparsegpt_core", "sparsegpt_counts", "sparsegpt_prune"]
