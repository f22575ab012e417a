"""LiSSA (Agarwal et al. 2017): the damped inverse as a Neumann series, every unit at once.

    x_0 = v_b / s_b,   x_{t+1} = x_t + (v_b - (G_b + lambda_b I) x_t) / s_b

whose fixed point is (G_b + lambda_b I)^-1 v_b -- the damping is ADDED (DataInf's own
LiSSA subtracts it, which solves a different, possibly indefinite system). It converges
when s_b > (lambda_max(G_b) + lambda_b) / 2; by default s_b = lambda_max + lambda_b, with
lambda_max from `power_iters` power iterations (each one pass over the gradients), at
the rate 1 - lambda_b / s_b per step. Stops when every unit's relative residual is at
most `tol`; raises with the worst unit's residual after `max_iter` steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..core import safe_div
from . import IterativeSolver, register


def top_eigenvalue(ctx, iters: int):
    """Power iteration per unit on G_b from the validation vectors: [M, L, U]."""
    x = list(ctx.v)
    est = jnp.zeros((x[0].shape[0],) + ctx.lam.shape, jnp.float32)
    for _ in range(iters):
        norm = jnp.sqrt(ctx.unit_dot(x, x))
        x = ctx.scale(x, safe_div(1.0, norm))
        gx = ctx.matvec(x)
        est = ctx.unit_dot(x, gx)                      # Rayleigh quotient (||x|| = 1)
        x = gx
    return est


@register
@dataclasses.dataclass(frozen=True)
class LiSSA(IterativeSolver):
    name = "lissa"               # one product per power iteration and per step
    max_iter: int = 2000
    scale: float | None = None   # s_b for every unit; None: lambda_max + lambda_b
    power_iters: int = 20

    def precondition(self, ctx):
        ctx.require_kept(self.name, "takes one pass over the training gradients per step")
        A = self.damped(ctx)
        lam = jnp.broadcast_to(ctx.lam, (ctx.v[0].shape[0],) + ctx.lam.shape)
        s = (jnp.full_like(lam, self.scale) if self.scale is not None
             else 1.05 * top_eigenvalue(ctx, self.power_iters) + lam)
        vnorm = jnp.sqrt(ctx.unit_dot(ctx.v, ctx.v))
        x = ctx.scale(ctx.v, 1.0 / s)
        it = 0
        while True:
            r = ctx.sub(ctx.v, A(x))
            rel = self.residual(ctx, r, vnorm)
            if rel.max() <= self.tol or it >= self.max_iter:
                break
            x = ctx.axpy(x, r, 1.0 / s)
            it += 1
        self.finish(ctx, rel, it)
        return x
