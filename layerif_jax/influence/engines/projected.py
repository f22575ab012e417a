"""Random projection of per-example gradients (TRAK-style Johnson-Lindenstrauss): any
engine's gradients, each unit's g_i,b (d_b values) mapped to R_b^T g_i,b (k values),
R_b [d_b, k] Gaussian with variance 1/k, so inner products are kept in expectation.

Every estimator then runs in the projected space: one unit of k values per (layer,
unit) of the original partition. This is what lets influence run on the FULL weights
of chosen blocks of a model without LoRA (pass them as `params`): memory and the
estimators' cost scale with k, not with d_b. R_b is drawn from `seed` and the unit's
index inside the compiled call (never stored), identically for training and
validation gradients. The per-example gradient is formed before it is projected (as
TRAK does); the Kronecker-factored projection of LoGra, which never forms it, needs
the layers' inputs and output gradients and is not here.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import LayerIFError
from ..core import precision
from ..partition import Partition


def projected_partition(part: Partition, k: int) -> Partition:
    """One leaf of k values per (layer, unit) present in `part`, named after both."""
    sizes = part.sizes()
    present = [(l, u) for l in range(part.num_layers) for u in range(part.num_units)
               if sizes[l, u] > 0]
    return Partition(
        leaf_names=tuple(f"{part.unit_names[u]}@{part.layer_ids[l]}" for l, u in present),
        leaf_index=tuple(range(len(present))),
        leaf_layers=tuple((l,) for l, _ in present),
        leaf_stacked=(False,) * len(present),
        leaf_unit=tuple(u for _, u in present),
        leaf_piece_size=(k,) * len(present),
        unit_names=part.unit_names, layer_ids=part.layer_ids, unit=part.unit)


class ProjectedEngine:
    """Wraps an engine: the same chunks, gradients projected unit by unit."""

    def __init__(self, inner, part: Partition, k: int, seed: int = 0):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise LayerIFError(f"projection must be an integer >= 1, got {k!r}")
        self.inner, self.k, self.seed = inner, int(k), int(seed)
        self.name = f"{inner.name}+projection"
        leaf, layer, unit = part.pieces()
        sizes = part.sizes()
        present = [(l, u) for l in range(part.num_layers) for u in range(part.num_units)
                   if sizes[l, u] > 0]
        off = np.cumsum([0] + [len(ls) for ls in part.leaf_layers])
        # for every projected unit: its pieces as (leaf, piece of the leaf)
        self.groups = tuple(tuple((int(leaf[p]), int(p - off[leaf[p]]))
                                  for p in np.flatnonzero((layer == l) & (unit == u)))
                            for l, u in present)
        self.part = projected_partition(part, self.k)

    def plan(self, example_sets) -> None:
        self.inner.plan(example_sets)

    def chunks(self, data):
        return self.inner.chunks(data)

    def grads(self, c):
        g, finite = self.inner.grads(c)
        return _project(tuple(g), self.groups, self.k, self.seed), finite

    def describe(self, calls: Sequence[Any]) -> dict[str, Any]:
        return {**self.inner.describe(calls), "projection": self.k,
                "projection_seed": self.seed}

    def curvature_product(self, *args, **kw):
        raise LayerIFError("a projected run works with the empirical Fisher of the projected "
                           "gradients only (curvature='empirical_fisher')")


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _project(g, groups, k: int, seed: int):
    key = jax.random.key(seed)
    out = []
    for j, where in enumerate(groups):
        x = jnp.concatenate([g[a][:, b].reshape(g[a].shape[0], -1).astype(jnp.float32)
                             for a, b in where], 1)                     # [B, d_b]
        R = jax.random.normal(jax.random.fold_in(key, j), (x.shape[1], k), jnp.float32)
        out.append((jnp.matmul(x, R, precision=precision()) / np.sqrt(k))[:, None])  # [B,1,k]
    return out
