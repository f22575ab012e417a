"""Wanda (Sun et al. 2023): score |W_ij| * ||x_i||_2 over the calibration tokens, zero
the lowest in each output column of the [d_in, d_out] kernel (or N:M); no weight update."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..masks import apply_mask, lowest_k_cols, lowest_nm, wanda_score
from . import PrunerBase, nm_count, register_pruner


@functools.partial(jax.jit, static_argnames=("nm",))
def _wanda(W, sq, k, *, nm):
    score = wanda_score(W, jnp.sqrt(sq))
    return apply_mask(W, lowest_nm(score, *nm) if nm is not None else lowest_k_cols(score, k))


@register_pruner
@dataclasses.dataclass(frozen=True)
class Wanda(PrunerBase):
    name = "wanda"
    calibration = "sq"
    default_epsilon = 0.1

    def prune(self, W, sparsity, nm, stats, n_tok):
        if nm:
            return (*_wanda(W, stats["sq"], 0, nm=nm), nm_count(W, nm))
        k = int(round(sparsity * W.shape[0]))
        return (*_wanda(W, stats["sq"], k, nm=None), k * W.shape[1])
