"""DataInf (Kwon et al. 2024): per-unit Sherman-Morrison average, closed form (METHOD.md 2.1).

h_b = (1 / (n lambda_b)) (n v_b - sum_i c_i,b g_i,b),
c_i,b = (v_b . g_i,b) / (lambda_b + ||g_i,b||^2).
Needs one weighted gradient sum per unit: one extra pass over the gradients that
were not kept.
"""

from __future__ import annotations

import dataclasses

from .. import core
from . import EstimatorBase, register


@register
@dataclasses.dataclass(frozen=True)
class DataInf(EstimatorBase):
    name = "datainf"

    def precondition(self, ctx):
        c = core.datainf_coef(ctx.vg_u, ctx.sq_u, ctx.lam)
        w = ctx.weighted_sum(c)
        return core.datainf_h(ctx.v, w, ctx.leaf_view(ctx.lam), ctx.n)
