"""Explicit damped inverse per unit, (G_b + lambda_b I)^-1 v_b, G_b = (1/n) sum_i g g^T.

The reference the approximations are measured against: solved on the host in
float64, directly when d_b <= n, through the Woodbury identity otherwise (an n x n
solve). Holds the gradients of a unit in memory: meant for small models and units.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..distributed import to_host
from . import register, to_jnp


@register
@dataclasses.dataclass(frozen=True)
class Exact:
    name = "exact"
    extra_passes = 1
    needs_all_gradients = True

    def precondition(self, ctx):
        part, n = ctx.part, ctx.n
        leaves = None
        for _, g in ctx.chunks():
            host = [to_host(x, np.float64) for x in g]
            leaves = host if leaves is None else [np.concatenate([a, b]) for a, b in zip(leaves, host)]
        lam = to_host(ctx.lam, np.float64)
        v = [to_host(x, np.float64) for x in ctx.v]
        h = [np.zeros_like(x) for x in v]
        leaf, layer, unit = part.pieces()
        off = np.cumsum([0] + [len(ls) for ls in part.leaf_layers])
        for l in range(part.num_layers):
            for u in range(part.num_units):
                ps = np.flatnonzero((layer == l) & (unit == u))
                if not ps.size:
                    continue
                where = [(leaf[p], p - off[leaf[p]]) for p in ps]  # (leaf, its piece)
                X = np.concatenate([leaves[k][:, j].reshape(leaves[k].shape[0], -1)
                                    for k, j in where], 1)
                V = np.concatenate([v[k][:, j].reshape(v[k].shape[0], -1) for k, j in where], 1)
                H = damped_inverse_apply(X, V, n, lam[l, u])
                col = 0
                for k, j in where:
                    size = int(np.prod(v[k].shape[2:]))
                    h[k][:, j] = H[:, col:col + size].reshape(h[k][:, j].shape)
                    col += size
        return to_jnp(h)


def damped_inverse_apply(X: np.ndarray, V: np.ndarray, n: int, lam: float) -> np.ndarray:
    """Rows of V times (X^T X / n + lam I)^-1 (X: [n_pad, d], filler rows zero)."""
    d = X.shape[1]
    if d <= X.shape[0]:
        A = X.T @ X / n + lam * np.eye(d)
        return np.linalg.solve(A, V.T).T
    # Woodbury: (lam I + X^T X / n)^-1 = (1/lam) (I - X^T (n lam I + X X^T)^-1 X)
    K = X @ X.T + n * lam * np.eye(X.shape[0])
    return (V - (np.linalg.solve(K, X @ V.T)).T @ X) / lam
