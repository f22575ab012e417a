"""Magnitude pruning: zero the smallest |W| of the whole matrix (or N:M)."""

from __future__ import annotations

import dataclasses
import functools

import jax

from ..masks import apply_mask, lowest_k_flat, lowest_nm, magnitude_score
from . import PrunerBase, nm_count, register_pruner


@functools.partial(jax.jit, static_argnames=("nm",))
def _magnitude(W, k, *, nm):
    score = magnitude_score(W)
    return apply_mask(W, lowest_nm(score, *nm) if nm is not None else lowest_k_flat(score, k))


@register_pruner
@dataclasses.dataclass(frozen=True)
class Magnitude(PrunerBase):
    name = "magnitude"
    calibration = None
    default_epsilon = 0.3

    def prune(self, W, sparsity, nm, stats, n_tok):
        k = nm_count(W, nm) if nm else int(round(sparsity * W.size))
        return (*_magnitude(W, k, nm=nm), k)
