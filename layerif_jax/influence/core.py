"""Pure, jit- and vmap-able building blocks of layer-wise influence.

Shapes: B examples in a chunk, M validation vectors (1 = the mean validation gradient,
m = one per validation example), P pieces, L layers, U units (see `partition`).
Gradients are lists of leaves in *piece form*: leaf k has shape [B, P_k, ...], where
P_k is its number of pieces (L for a leaf with a leading layer axis, else 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..ops import precision


def _flat(x: jax.Array, lead: int) -> jax.Array:
    """[*lead_dims, P_k, *shape] -> [*lead_dims, P_k, D]."""
    return x.reshape(*x.shape[:lead + 1], -1)


def _offsets(leaves) -> np.ndarray:
    """Where each leaf's pieces start along P (static: from the shapes)."""
    return np.cumsum([0] + [g.shape[1] for g in leaves])


def sq_norms(g_leaves) -> jax.Array:
    """||g_i,piece||^2 -> [B, P]."""
    return jnp.concatenate([jnp.sum(jnp.square(_flat(g, 1).astype(jnp.float32)), -1)
                            for g in g_leaves], -1)


def dots(g_leaves, h_leaves) -> jax.Array:
    """g_i . h_j per piece: g [B, P_k, ...], h [M, P_k, ...] -> [B, M, P]."""
    return jnp.concatenate([jnp.einsum("bpd,mpd->bmp", _flat(g, 1).astype(jnp.float32),
                                       _flat(h, 1).astype(jnp.float32), precision=precision())
                            for g, h in zip(g_leaves, h_leaves)], -1)


def safe_div(num, den):
    """num / den where den > 0, else 0 (a unit with nothing in it stays at zero)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def pair_dots(a_leaves, b_leaves) -> jax.Array:
    """a_m . b_m per piece (the same row m of both): leaves [M, P_k, ...] -> [M, P]."""
    return jnp.concatenate([jnp.sum(_flat(a, 1).astype(jnp.float32)
                                    * _flat(b, 1).astype(jnp.float32), -1)
                            for a, b in zip(a_leaves, b_leaves)], -1)


def scale_pieces(x_leaves, s_MP: jax.Array) -> list[jax.Array]:
    """Each piece of x times its own scalar: leaves [M, P_k, ...], s [M, P]."""
    off = _offsets(x_leaves)
    return [x * s_MP[:, off[k]:off[k + 1]].reshape(s_MP.shape[:1] + x.shape[1:2]
                                                   + (1,) * (x.ndim - 2))
            for k, x in enumerate(x_leaves)]


def weighted_sum(coef_BMP: jax.Array, g_leaves) -> list[jax.Array]:
    """sum_i coef[i, m, piece] g_i,piece -> leaves [M, P_k, ...]."""
    off = _offsets(g_leaves)
    out = []
    for k, g in enumerate(g_leaves):
        w = jnp.einsum("bmp,bpd->mpd", coef_BMP[..., off[k]:off[k + 1]],
                       _flat(g, 1).astype(jnp.float32), precision=precision())
        out.append(w.reshape(w.shape[:2] + g.shape[2:]))
    return out


def mean_leaves(g_leaves, n: int) -> list[jax.Array]:
    """Sum over the chunk, divided by n: leaves [1, P_k, ...] (filler rows are exactly zero)."""
    return [jnp.sum(g.astype(jnp.float32), axis=0, keepdims=True) / n for g in g_leaves]


def to_units(x_P: jax.Array, onehot_PLU: jax.Array) -> jax.Array:
    """Sum the trailing piece axis into (layer, unit): [..., P] -> [..., L, U]."""
    return jnp.einsum("...p,plu->...lu", x_P, onehot_PLU, precision=precision())


def datainf_lambda(sq_nLU: jax.Array, sizes_LU: jax.Array, scale: float = 0.1) -> jax.Array:
    """Adaptive damping per unit: lambda = scale * mean_i ||g_i||^2 / d. -> [L, U]."""
    return scale * jnp.mean(sq_nLU, axis=0) / jnp.maximum(sizes_LU, 1)


def datainf_coef(vg_nMLU, sq_nLU, lam_LU) -> jax.Array:
    """c_i = (v . g_i) / (lambda + ||g_i||^2) -> [n, M, L, U]."""
    return vg_nMLU / (lam_LU + sq_nLU)[:, None]


def datainf_h(v_leaves, w_leaves, lam_P: jax.Array, n: int) -> list[jax.Array]:
    """h = (1 / (n lambda)) (n v - sum_i c_i g_i), leaf by leaf: leaves [M, P_k, ...]."""
    off = _offsets(v_leaves)
    out = []
    for k, (v, w) in enumerate(zip(v_leaves, w_leaves)):
        lam = lam_P[off[k]:off[k + 1]].reshape((1, -1) + (1,) * (v.ndim - 2))
        out.append((n * v - w) / (n * lam))
    return out


def to_pieces(leaves, stacked) -> list[jax.Array]:
    """Per-example gradient leaves [B, ...] -> piece form: a leaf without a layer axis
    gets one of size 1."""
    return [g if s else g[:, None] for g, s in zip(leaves, stacked)]
