"""Conjugate gradient on (G_b + lambda_b I) x = v_b, every unit of every layer at once.

G_b = (1/n) sum_i g_i,b g_i,b^T (the empirical Fisher). Each iteration is one product
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
from ..engines.general import CURVATURES
from . import register


def damped_operator(ctx):
    """x -> (G_b + lambda_b I) x for every unit (leaves [M, P_k, ...])."""
    def apply(x):
        lam = jnp.broadcast_to(ctx.lam, (x[0].shape[0],) + ctx.lam.shape)
        return [gx + lx for gx, lx in zip(ctx.matvec(x), ctx.scale(x, lam))]
    return apply


def relative(res_MLU, vnorm_MLU) -> np.ndarray:
    """Relative residual per unit; 0 where v is zero (nothing to solve)."""
    res, vn = to_host(res_MLU, np.float64), to_host(vnorm_MLU, np.float64)
    return np.where(vn > 0, res / np.where(vn > 0, vn, 1.0), 0.0)


def not_converged(name: str, ctx, rel: np.ndarray, iters: int, tol: float) -> LayerIFError:
    m, l, u = np.unravel_index(int(np.argmax(rel)), rel.shape)
    return LayerIFError(
        f"{name} did not converge in {iters} iterations: relative residual {rel.max():.2e} "
        f"(tol {tol:g}) at {ctx.part.describe(int(l), int(u))}; raise max_iter or the damping")


@register
@dataclasses.dataclass(frozen=True)
class CG:
    name = "cg"
    extra_passes = 1             # plus one pass per iteration over the kept gradients
    needs_all_gradients = False
    curvatures = CURVATURES
    tol: float = 1e-5            # relative residual every unit must reach
    max_iter: int = 200

    def precondition(self, ctx):
        ctx.require_kept(self.name, "takes one pass over the training gradients per iteration")
        A = damped_operator(ctx)
        vnorm = jnp.sqrt(ctx.unit_dot(ctx.v, ctx.v))
        x = [jnp.zeros_like(v) for v in ctx.v]
        r = list(ctx.v)
        it, restarts = 0, 0
        while True:
            # (re)start from the true residual: in float32 the recursive one drifts below it
            p = list(r)
            rs = ctx.unit_dot(r, r)
            rel = relative(jnp.sqrt(rs), vnorm)
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
                alpha = jnp.where(pAp > 0, rs / jnp.where(pAp > 0, pAp, 1.0), 0.0)
                x = [a + b for a, b in zip(x, ctx.scale(p, alpha))]
                r = [a - b for a, b in zip(r, ctx.scale(Ap, alpha))]
                rs_new = ctx.unit_dot(r, r)
                beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
                p = [a + b for a, b in zip(r, ctx.scale(p, beta))]
                rs = rs_new
                it += 1
                rel = relative(jnp.sqrt(rs), vnorm)
            r = [a - b for a, b in zip(ctx.v, A(x))]
            rel = relative(jnp.sqrt(ctx.unit_dot(r, r)), vnorm)
            if rel.max() <= self.tol or it >= self.max_iter or restarts >= 5:
                break
            restarts += 1
        ctx.report.update(iterations=it, restarts=restarts,
                          max_relative_residual=float(rel.max()))
        if rel.max() > self.tol:
            raise not_converged(self.name, ctx, rel, it, self.tol)
        return x
