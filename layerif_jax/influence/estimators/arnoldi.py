"""Arnoldi / Lanczos (Schioppa et al. 2022): the top-k eigenpairs of G_b per unit, then
the damped inverse in that eigenbasis -- every unit of every layer at once.

k steps of Lanczos with full re-orthogonalisation on the empirical Fisher G_b (G_b is
symmetric, so Arnoldi is Lanczos), from a fixed random start per unit; the k x k
tridiagonal matrices are diagonalised on the host in float64, giving Ritz pairs
(theta_j, y_j). Then

    h_b = sum_j (y_j . v_b) / (theta_j + lambda_b) y_j + (v_b - sum_j (y_j . v_b) y_j) / lambda_b

(the second term treats the rest of the space as eigenvalue 0). With k >= rank(G_b) + 1
the Krylov space holds G_b's whole range and h_b is the exact damped inverse; smaller k
keeps the top of the spectrum, which is what dominates. A unit whose Krylov space is
exhausted early stops there (its later vectors are zero). Costs k passes over the kept
gradients; `report` holds the top Ritz value of every unit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..distributed import accumulate, to_host
from ..engines.general import CURVATURES
from ..core import safe_div
from . import EstimatorBase, register


@register
@dataclasses.dataclass(frozen=True)
class Arnoldi(EstimatorBase):
    name = "arnoldi"             # plus k products (one per Lanczos step)
    curvatures = CURVATURES
    k: int = 20                  # Lanczos steps = eigenpairs per unit
    seed: int = 0

    def precondition(self, ctx):
        ctx.require_kept(self.name, "takes one pass over the training gradients per step")
        keys = jax.random.split(jax.random.key(self.seed), len(ctx.v))
        start = [jax.random.normal(kk, (1,) + v.shape[1:], jnp.float32)
                 for kk, v in zip(keys, ctx.v)]
        q = ctx.scale(start, safe_div(1.0, jnp.sqrt(ctx.unit_dot(start, start))))
        Q, alpha, beta = [], [], []
        top = jnp.zeros_like(ctx.lam)[None]          # largest |alpha| so far, [1, L, U]
        for _ in range(self.k):
            Q.append(q)
            w = ctx.matvec(q)
            alpha.append(ctx.unit_dot(q, w)[0])
            for _ in range(2):                       # full re-orthogonalisation, twice
                for qi in Q:
                    w = ctx.axpy(w, qi, -ctx.unit_dot(qi, w))
            b = jnp.sqrt(ctx.unit_dot(w, w))         # [1, L, U], an eigenvalue's scale
            top = jnp.maximum(top, jnp.abs(alpha[-1])[None])
            alive = b > 1e-5 * top                   # the Krylov space is not exhausted
            beta.append(jnp.where(alive, b, 0.0)[0])
            q = ctx.scale(w, jnp.where(alive, 1.0 / jnp.where(alive, b, 1.0), 0.0))
        theta, S = _ritz(np.stack([to_host(a, np.float64) for a in alpha]),
                         np.stack([to_host(b, np.float64) for b in beta]))
        ys = [_combine(ctx, Q, S[:, j]) for j in range(len(Q))]
        lam = jnp.broadcast_to(ctx.lam, (ctx.v[0].shape[0],) + ctx.lam.shape)
        h = ctx.scale(ctx.v, 1.0 / lam)
        for j, y in enumerate(ys):
            c = ctx.unit_dot(y, ctx.v)            # y [1, ...] broadcasts: [M, L, U]
            th = jnp.asarray(theta[j], jnp.float32)[None]
            coef = c / (th + lam) - c / lam
            h = ctx.axpy(h, y, coef)
        ritz_top = theta.max(0)
        ctx.report.update(k=len(Q), top_eigenvalue={
            ctx.part.describe(int(l), int(u)): float(ritz_top[l, u])
            for l, u in np.argwhere(ctx.part.sizes() > 0)})
        return h


def _ritz(alpha: np.ndarray, beta: np.ndarray):
    """Ritz values [k, L, U] and the tridiagonals' eigenvectors [k, k, L, U], per unit,
    in float64. Rows past an exhausted Krylov space are zero and give Ritz vectors 0."""
    k, L, U = alpha.shape
    theta, S = np.zeros((k, L, U)), np.zeros((k, k, L, U))
    for l in range(L):
        for u in range(U):
            T = np.diag(alpha[:, l, u]) + np.diag(beta[:-1, l, u], 1) + np.diag(beta[:-1, l, u], -1)
            theta[:, l, u], S[:, :, l, u] = np.linalg.eigh(T)
    return theta, S


def _combine(ctx, Q, s_kLU):
    """sum_i s_i,b Q_i (per unit): one Ritz vector, leaves [1, P_k, ...]."""
    out = None
    for qi, si in zip(Q, s_kLU):
        out = accumulate(out, ctx.scale(qi, jnp.asarray(si, jnp.float32)[None]))
    return out
