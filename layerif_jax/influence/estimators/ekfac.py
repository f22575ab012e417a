"""EK-FAC (George et al. 2018; for influence, Grosse et al. 2023): K-FAC's eigenbases
(see kfac.py) with the eigenvalues corrected on the per-example gradients themselves,

    Lambda_jk = (1/n) sum_i (Q_L^T G_i Q_R)_jk^2

the diagonal of the empirical Fisher in the Kronecker eigenbasis, from one more pass
over the training gradients (with curvature="true_fisher": over the gradients at labels
drawn from the model, recomputed with the same draws as the factors'). When the empirical Fisher is exactly a Kronecker product
(or only its eigenbasis is), this is the exact damped inverse.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ...ops import precision
from ..distributed import accumulate, to_host
from . import register
from .kfac import KFAC


@register
@dataclasses.dataclass(frozen=True)
class EKFAC(KFAC):
    name = "ekfac"         # plus one pass over the kept gradients
    extra_passes = 1

    def eigenvalues(self, ctx, QL, QR, eL, eR):
        ql = [jnp.asarray(q, jnp.float32) for q in QL]
        qr = [jnp.asarray(q, jnp.float32) for q in QR]
        acc = None
        for _, g in (ctx.curvature_chunks or ctx.chunks)():
            acc = accumulate(acc, _rotated_squares(g, ql, qr))
        return [to_host(a, np.float64) / ctx.n for a in acc]


@jax.jit
def _rotated_squares(g, ql, qr):
    """sum over the rows of (Q_L^T G_i Q_R)^2 per leaf: [P_k, a, b]."""
    return [jnp.sum(jnp.square(jnp.einsum("pac,npab,pbd->npcd", l, x.astype(jnp.float32), r,
                                          precision=precision())), 0)
            for x, l, r in zip(g, ql, qr)]


__all__ = ["EKFAC"]
