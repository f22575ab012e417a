"""Layer scores S^(l) from per-example layer scores (METHOD.md section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATES = ("+ve", "top25", "all")


def aggregate(per_example_nL, how: str):
    """+ve: sum of positive scores; top25: sum of the largest ceil(n_pos/4) positive
    scores; all: signed sum. Works on numpy or jax arrays of shape [n, L]."""
    xp = jnp if isinstance(per_example_nL, jax.Array) else np
    x = per_example_nL
    pos = xp.where(x > 0, x, 0)
    if how == "+ve":
        return pos.sum(0)
    if how == "all":
        return x.sum(0)
    if how == "top25":
        n_pos = (x > 0).sum(0)
        k = -(-n_pos // 4)
        srt = -xp.sort(-pos, axis=0)  # descending
        rank = xp.arange(x.shape[0])[:, None]
        return xp.where(rank < k[None, :], srt, 0).sum(0)
    raise ValueError(f"unknown aggregate {how!r} (choose from {', '.join(AGGREGATES)})")
