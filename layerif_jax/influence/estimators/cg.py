"""Conjugate gradient on (G_b + lambda_b I) x = v_b, every unit of every layer at once.

G_b: the run's curvature (by default the empirical Fisher (1/n) sum_i g_i,b g_i,b^T;
the Gauss-Newton or the Hessian on the general path). Each iteration is one product
with G_b for all units together (one pass over the kept training gradients) and
per-unit step sizes; it stops when every unit's relative residual
||v_b - (G_b + lambda_b I) x_b|| / ||v_b|| is at most `tol`, and raises, naming the
worst unit and its residual, when `max_iter` iterations do not get there. Converges to
the exact damped inverse (in exact arithmetic within d_b iterations, in practice far
fewer: the condition number of G_b + lambda_b I sets the pace). The damping is added
(+lambda), as in METHOD.md 2.1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ...errors import LayerIFError
from ..distributed import to_host
from ..core import safe_div
from . import IterativeSolver, register


@register
@dataclasses.dataclass(frozen=True)
class CG(IterativeSolver):
    name = "cg"                  # one product per iteration (a pass over kept gradients)

    def precondition(self, ctx):
        ctx.require_kept(self.name, "takes one pass over the training gradients per iteration")
        A = self.damped(ctx)
        vnorm = jnp.sqrt(ctx.unit_dot(ctx.v, ctx.v))
        x = [jnp.zeros_like(v) for v in ctx.v]
        r = list(ctx.v)
        it, restarts = 0, 0
        while True:
            # (re)start from the true residual: in float32 the recursive one drifts below it
            p = list(r)
            rs = ctx.unit_dot(r, r)
            rel = self.residual(ctx, r, vnorm, rs)
            while rel.max() > self.tol and it < self.max_iter:
                Ap = A(p)
                pAp = ctx.unit_dot(p, Ap)
                bad = np.argwhere((to_host(pAp) <= 0) & (rel > self.tol))   # unconverged
                if len(bad):  # the Hessian can have negative curvature beyond the damping
                    m, l, u = bad[0]
                    raise LayerIFError(
                        f"{self.name}: the damped curvature is not positive definite at "
                        f"{ctx.part.describe(int(l), int(u))} (p^T A p = "
                        f"{float(pAp[m, l, u]):.3g}); raise the damping or use exact")
                alpha = safe_div(rs, pAp)
                x = ctx.axpy(x, p, alpha)
                r = ctx.axpy(r, Ap, -alpha)
                rs_new = ctx.unit_dot(r, r)
                beta = safe_div(rs_new, rs)
                p = ctx.axpy(r, p, beta)
                rs = rs_new
                it += 1
                rel = self.residual(ctx, r, vnorm, rs)
            r = ctx.sub(ctx.v, A(x))
            rel = self.residual(ctx, r, vnorm)
            if rel.max() <= self.tol or it >= self.max_iter or restarts >= 5:
                break
            restarts += 1
        self.finish(ctx, rel, it, restarts=restarts)
        return x
