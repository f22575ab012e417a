"""Explicit damped inverse per unit, (G_b + lambda_b I)^-1 v_b, G_b = (1/n) sum_i g g^T.

The reference the approximations are measured against: solved on the host in
float64, directly when d_b <= n, through the Woodbury identity otherwise (an n x n
solve). Holds the gradients of a unit in memory: meant for small models and units. With the
Gauss-Newton or Hessian curvature each unit's matrix is built from d_b products.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...errors import LayerIFError
from ..distributed import to_host
from ..engines.general import CURVATURES
from . import EstimatorBase, register, to_jnp


@register
@dataclasses.dataclass(frozen=True)
class Exact(EstimatorBase):
    name = "exact"
    needs_all_gradients = True
    curvatures = CURVATURES
    max_unit_size: int = 4096    # another curvature is built column by column: d_b products

    def precondition(self, ctx):
        part = ctx.part
        lam = to_host(ctx.lam, np.float64)
        v = [to_host(x, np.float64) for x in ctx.v]
        h = [np.zeros_like(x) for x in v]
        units = _units(part)
        if ctx.product is None:
            leaves = None
            for _, g in ctx.chunks():
                host = [to_host(x, np.float64) for x in g]
                leaves = host if leaves is None else [np.concatenate([a, b])
                                                      for a, b in zip(leaves, host)]
            solve = lambda l, u, where, V: damped_inverse_apply(   # noqa: E731
                _gather(leaves, where), V, ctx.n, lam[l, u])
        else:
            C = _explicit_curvature(ctx, units, self.max_unit_size)
            solve = lambda l, u, where, V: np.linalg.solve(        # noqa: E731
                C[(l, u)] + lam[l, u] * np.eye(len(C[(l, u)])), V.T).T
        for (l, u), where in units.items():
            H = solve(l, u, where, _gather(v, where))
            col = 0
            for k, j in where:
                size = int(np.prod(v[k].shape[2:]))
                h[k][:, j] = H[:, col:col + size].reshape(h[k][:, j].shape)
                col += size
        return to_jnp(h)


def _units(part) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(layer, unit) -> its pieces as (leaf, piece of the leaf), in order."""
    leaf, layer, unit = part.pieces()
    off = np.cumsum([0] + [len(ls) for ls in part.leaf_layers])
    out = {}
    for l in range(part.num_layers):
        for u in range(part.num_units):
            ps = np.flatnonzero((layer == l) & (unit == u))
            if ps.size:
                out[(l, u)] = [(int(leaf[p]), int(p - off[leaf[p]])) for p in ps]
    return out


def _gather(leaves, where) -> np.ndarray:
    """[rows, d_b]: a unit's pieces of every row, flattened side by side."""
    return np.concatenate([leaves[k][:, j].reshape(leaves[k].shape[0], -1) for k, j in where], 1)


def _explicit_curvature(ctx, units, limit: int) -> dict:
    """C_b [d_b, d_b] of every unit from ONE batched product: row r of the probe holds
    the r-th coordinate vector of every unit at once (the product is block-diagonal)."""
    sizes = {key: sum(int(np.prod(ctx.v[k].shape[2:])) for k, _ in where)
             for key, where in units.items()}
    D = max(sizes.values())
    if D > limit:
        raise LayerIFError(f"exact with another curvature builds every unit's matrix: the "
                           f"largest unit has {D} parameters, over max_unit_size={limit}")
    E = [np.zeros((D,) + x.shape[1:], np.float32) for x in ctx.v]
    for where in units.values():
        col = 0
        for k, j in where:
            size = int(np.prod(ctx.v[k].shape[2:]))
            flat = E[k][:, j].reshape(D, size)
            flat[np.arange(col, col + size), np.arange(size)] = 1.0
            E[k][:, j] = flat.reshape(E[k][:, j].shape)
            col += size
    R = [to_host(x, np.float64) for x in ctx.matvec(to_jnp(E))]
    out = {}
    for key, where in units.items():
        C = _gather(R, where)[:sizes[key]]
        out[key] = (C + C.T) / 2            # symmetric up to rounding
    return out


def damped_inverse_apply(X: np.ndarray, V: np.ndarray, n: int, lam: float) -> np.ndarray:
    """Rows of V times (X^T X / n + lam I)^-1 (X: [n_pad, d], filler rows zero)."""
    d = X.shape[1]
    if d <= X.shape[0]:
        A = X.T @ X / n + lam * np.eye(d)
        return np.linalg.solve(A, V.T).T
    # Woodbury: (lam I + X^T X / n)^-1 = (1/lam) (I - X^T (n lam I + X X^T)^-1 X)
    K = X @ X.T + n * lam * np.eye(X.shape[0])
    return (V - (np.linalg.solve(K, X @ V.T)).T @ X) / lam
