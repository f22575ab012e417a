"""Pure, jit- and vmap-able building blocks of layer-wise influence.

Shapes: B examples in a chunk, L layers, M validation vectors (1 = the mean
validation gradient, m = one per validation example), K LoRA leaves, U units.
A "leaf list" is the flattened LoRA pytree; each leaf has shape [..., L, *shape].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ..loss import example_losses

from ..model.decoder import precision  # noqa: F401  (re-exported: the influence sums use it)


def per_example_grad_fn(graphdef, dtype=None) -> Callable:
    """(lora, rest, ids_BT, mask_BT, targets_BT) -> (grads: lora-shaped, leaves [B, L, ...], finite_B).

    One `vmap(grad)` over the chunk: per-example gradients of the example's mean
    token loss, restricted to the LoRA parameters, all layers at once.
    """

    def loss_one(lora, rest, ids_T, mask_T, tgt_T):
        model = nnx.merge(graphdef, lora, rest)
        logits = model(ids_T[None], mask_T[None], dtype=dtype)
        return example_losses(logits, ids_T[None], tgt_T[None])[0]

    per_ex = jax.vmap(jax.grad(loss_one), in_axes=(None, None, 0, 0, 0))

    def fn(lora, rest, ids_BT, mask_BT, targets_BT):
        grads = per_ex(lora, rest, ids_BT, mask_BT, targets_BT)
        leaves = jax.tree.leaves(grads)
        B = ids_BT.shape[0]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g.reshape(B, -1)), axis=1)
                                    for g in leaves]), axis=0)
        return grads, finite

    return fn


def _flat(x: jax.Array, lead: int) -> jax.Array:
    """[*lead_dims, L, *shape] -> [*lead_dims, L, D]."""
    return x.reshape(*x.shape[:lead + 1], -1)


def sq_norms(g_leaves) -> jax.Array:
    """||g_i,leaf,l||^2 -> [B, L, K]."""
    return jnp.stack([jnp.sum(jnp.square(_flat(g, 1).astype(jnp.float32)), -1)
                      for g in g_leaves], -1)


def dots(g_leaves, h_leaves) -> jax.Array:
    """g_i . h_j per leaf and layer: g [B, L, ...], h [M, L, ...] -> [B, M, L, K]."""
    return jnp.stack([jnp.einsum("bld,mld->bml", _flat(g, 1).astype(jnp.float32),
                                 _flat(h, 1).astype(jnp.float32), precision=precision())
                      for g, h in zip(g_leaves, h_leaves)], -1)


def weighted_sum(coef_BMLK: jax.Array, g_leaves) -> list[jax.Array]:
    """sum_i coef[i, m, l, k] g_i,k,l -> leaves [M, L, ...]."""
    out = []
    for k, g in enumerate(g_leaves):
        w = jnp.einsum("bml,bld->mld", coef_BMLK[..., k], _flat(g, 1).astype(jnp.float32),
                       precision=precision())
        out.append(w.reshape(w.shape[:2] + g.shape[2:]))
    return out


def mean_leaves(g_leaves, n: int) -> list[jax.Array]:
    """Sum over the chunk, divided by n: leaves [1, L, ...] (filler rows are exactly zero)."""
    return [jnp.sum(g.astype(jnp.float32), axis=0, keepdims=True) / n for g in g_leaves]


def to_units(x_K: jax.Array, onehot_KU: jax.Array) -> jax.Array:
    """Sum the trailing leaf axis into units: [..., K] -> [..., U]."""
    return jnp.einsum("...k,ku->...u", x_K, onehot_KU, precision=precision())


def datainf_lambda(sq_nLU: jax.Array, sizes_U: jax.Array, scale: float = 0.1) -> jax.Array:
    """Adaptive damping per unit: lambda = scale * mean_i ||g_i||^2 / d. -> [L, U]."""
    return scale * jnp.mean(sq_nLU, axis=0) / sizes_U


def datainf_coef(vg_nMLU, sq_nLU, lam_LU) -> jax.Array:
    """c_i = (v . g_i) / (lambda + ||g_i||^2) -> [n, M, L, U]."""
    return vg_nMLU / (lam_LU + sq_nLU)[:, None]


def datainf_h(v_leaves, w_leaves, lam_LK: jax.Array, n: int) -> list[jax.Array]:
    """h = (1 / (n lambda)) (n v - sum_i c_i g_i), leaf by leaf: leaves [M, L, ...]."""
    out = []
    for k, (v, w) in enumerate(zip(v_leaves, w_leaves)):
        lam = lam_LK[:, k].reshape((1, -1) + (1,) * (v.ndim - 2))
        out.append((n * v - w) / (n * lam))
    return out


def aggregate(per_example_nL, how: str):
    """Layer score S^(l) from per-example layer scores (METHOD.md section 3).

    +ve: sum of positive scores; top25: sum of the largest ceil(n_pos/4) positive
    scores; all: signed sum. Works on numpy or jax arrays of shape [n, L].
    """
    xp = jnp if isinstance(per_example_nL, jax.Array) else __import__("numpy")
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
    raise ValueError(how)
