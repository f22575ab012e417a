"""Influence estimators behind one interface (METHOD.md section 2.2).

Every estimator turns the validation vectors v (leaves [M, L, ...]) into the
preconditioned vectors h ~ v^T (H_b + lambda_b I)^-1, unit by unit; the caller
then scores every training example as score_i = sum over a layer's units of
h_b . g_i,b. Adding an estimator means adding one class here and one line in
ESTIMATORS.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import LayerIFError
from . import core
from .distributed import to_host
from .partition import Partition


@dataclasses.dataclass
class Context:
    """What the first pass over the training set produced, and a way to stream gradients."""
    part: Partition
    n: int                          # real training examples
    v: list[jax.Array]              # validation vectors, leaves [M, L, ...]
    sq_u: jax.Array                 # ||g_i,b||^2, [n_pad, L, U] (filler rows are zero)
    vg_u: jax.Array                 # v_m . g_i,b, [n_pad, M, L, U]
    lam: jax.Array                  # damping per unit [L, U]
    chunks: Callable[[], Iterator[tuple[slice, list[jax.Array]]]]  # (rows, grad leaves [B, L, ...])
    kept: bool                      # every gradient is materialised (no recomputation)

    def leaf_view(self, x_U: jax.Array) -> jax.Array:
        """[..., U] -> [..., K]: each leaf takes its unit's value."""
        return x_U[..., np.asarray(self.part.leaf_unit)]

    def weighted_sum(self, coef_nMLU: jax.Array) -> list[jax.Array]:
        """sum_i coef[i, m, l, unit] g_i, one more pass over the gradients."""
        coef_K = self.leaf_view(coef_nMLU)
        acc = None
        for rows, g in self.chunks():
            w = _weighted_sum(coef_K[rows], g)
            acc = w if acc is None else [a + b for a, b in zip(acc, w)]
        return acc


_weighted_sum = jax.jit(core.weighted_sum)


class Estimator(Protocol):
    name: str

    def precondition(self, ctx: Context) -> list[jax.Array] | None:
        """h leaves [M, L, ...], or None for h = v (scores are then v . g, already known)."""


class Identity:
    """H = I: score = v . g (TracIn-style gradient dot)."""
    name = "identity"

    def precondition(self, ctx):
        return None


class DataInf:
    """Kwon et al. 2024: per-unit Sherman-Morrison average, closed form (METHOD.md 2.1).

    h_b = (1 / (n lambda_b)) (n v_b - sum_i c_i,b g_i,b),
    c_i,b = (v_b . g_i,b) / (lambda_b + ||g_i,b||^2).
    Needs one weighted gradient sum per unit: one extra pass over the gradients that
    were not kept.
    """
    name = "datainf"

    def precondition(self, ctx):
        c = core.datainf_coef(ctx.vg_u, ctx.sq_u, ctx.lam)
        w = ctx.weighted_sum(c)
        return core.datainf_h(ctx.v, w, ctx.leaf_view(ctx.lam), ctx.n)


class Exact:
    """Explicit damped inverse per unit, (G_b + lambda_b I)^-1 v_b, G_b = (1/n) sum_i g g^T.

    The reference the approximations are measured against: solved on the host in
    float64, directly when d_b <= n, through the Woodbury identity otherwise
    (an n x n solve). Needs the gradients of a unit in memory; meant for small
    models and units.
    """
    name = "exact"

    def precondition(self, ctx):
        part, n = ctx.part, ctx.n
        leaves = None
        for rows, g in ctx.chunks():
            host = [to_host(x, np.float64) for x in g]
            leaves = host if leaves is None else [np.concatenate([a, b]) for a, b in zip(leaves, host)]
        lam = to_host(ctx.lam, np.float64)
        v = [to_host(x, np.float64) for x in ctx.v]
        h = [np.zeros_like(x) for x in v]
        L = part.num_layers
        for u in range(part.num_units):
            ks = [k for k, uu in enumerate(part.leaf_unit) if uu == u]
            for l in range(L):
                X = np.concatenate([leaves[k][:, l].reshape(leaves[k].shape[0], -1) for k in ks], 1)
                V = np.concatenate([v[k][:, l].reshape(v[k].shape[0], -1) for k in ks], 1)
                H = _damped_inverse_apply(X, V, n, lam[l, u])
                off = 0
                for k in ks:
                    size = int(np.prod(v[k].shape[2:]))
                    h[k][:, l] = H[:, off:off + size].reshape(h[k][:, l].shape)
                    off += size
        return [jnp.asarray(x, jnp.float32) for x in h]


def _damped_inverse_apply(X: np.ndarray, V: np.ndarray, n: int, lam: float) -> np.ndarray:
    """Rows of V times (X^T X / n + lam I)^-1 (X: [n_pad, d], filler rows zero)."""
    d = X.shape[1]
    if d <= X.shape[0]:
        A = X.T @ X / n + lam * np.eye(d)
        return np.linalg.solve(A, V.T).T
    # Woodbury: (lam I + X^T X / n)^-1 = (1/lam) (I - X^T (n lam I + X X^T)^-1 X)
    K = X @ X.T + n * lam * np.eye(X.shape[0])
    return (V - (np.linalg.solve(K, X @ V.T)).T @ X) / lam


ESTIMATORS: dict[str, type] = {"datainf": DataInf, "identity": Identity, "exact": Exact}


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise LayerIFError(f"unknown estimator {name!r} (choose from {', '.join(ESTIMATORS)})") from None
