"""Gradient cosine per unit: cos(v_b, g_i,b), summed over a layer's units (no curvature,
no damping). Scale-free, so a unit with large gradients does not dominate its layer."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..core import safe_div
from . import EstimatorBase, register


@register
@dataclasses.dataclass(frozen=True)
class Cosine(EstimatorBase):
    name = "cosine"
    uses_damping = False

    def precondition(self, ctx):
        return ctx.scale(ctx.v, safe_div(1.0, jnp.sqrt(ctx.unit_dot(ctx.v, ctx.v))))

    def finalize(self, ctx, unit_scores):
        """[n_pad, M, L, U] scores v_b . g_i,b / ||v_b|| -> divided by ||g_i,b||."""
        return unit_scores * safe_div(1.0, jnp.sqrt(ctx.sq_u))[:, None]
