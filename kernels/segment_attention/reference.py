"""The definition, in pure JAX: causal grouped-query attention inside each segment.

    o[b, t, h] = sum_s p[b, h, t, s] v[b, s, h // G]
    p[b, h, t, :] = softmax_s(cap(scale * q[b, t, h] . k[b, s, h // G]) + mask)

where key s is visible to query t when s <= t, seg[b, s] == seg[b, t] and (with a
window) t - s < window. Tokens with a negative segment (padding) form one segment of
their own: a padding query sees the padding keys before it (never an empty row), and
no real query sees a padding key. cap(s) = softcap * tanh(s / softcap) when softcap is
given. The scores and the softmax run in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def visible(seg_BT, window: int | None) -> jax.Array:
    """[B, T, T] bool: may query t see key s (see the module docstring)."""
    T = seg_BT.shape[1]
    idx = jnp.arange(T)
    seg = jnp.where(seg_BT < 0, -1, seg_BT)
    ok = (idx[:, None] >= idx[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        ok = ok & (idx[:, None] - idx[None, :] < window)[None]
    return ok


def segment_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT, *, scale: float | None = None,
                      softcap: float | None = None, window: int | None = None) -> jax.Array:
    """[B, T, H, D] in q's dtype."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    q = q_BTHD.reshape(B, T, K, H // K, D)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BTKD, preferred_element_type=jnp.float32)
    s = s * (scale if scale is not None else 1.0 / math.sqrt(D))
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible(seg_BT, window)[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_BTKD.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_BTKD, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q_BTHD.dtype)
