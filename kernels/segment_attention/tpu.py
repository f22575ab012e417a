"""The TPU kernel: JAX's own splash attention (jax.experimental.pallas.ops.tpu.
splash_attention) with segment ids, not a rewrite of it.

Splash attention takes one sequence ([H, T, D] queries, [K, T, D] keys and values:
grouped-query attention as it is) and a static mask of every head (causal, or the local
band of a sliding window) that it skips by blocks; the segment ids mask inside the
blocks it computes. Rows are vmapped (pallas_call's batching adds a grid axis). T is
padded to a multiple of the block (128) with tokens of a segment no real token has; the
scale is applied to q (in float32, then q's dtype) since splash does not scale; the
softcap is splash's `attn_logits_soft_cap`. Its backward is splash's own dq and dkv
kernels (a custom_vjp), so it is differentiable as it is.

What it saves against the dense reference: the [B, H, T, T] float32 scores and
probabilities never reach HBM (the forward keeps the output and the log-sum-exp per
query), and blocks above the diagonal (or outside the window) are skipped. Blocks that
are all padding or all other examples' tokens are still computed: the segments are data,
not part of the static mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

BLOCK = 128
PAD_SEGMENT = -2   # the segment of the tokens padding T to a multiple of BLOCK


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, T: int, window: int | None, softcap: float | None, interpret: bool):
    """Splash attention for `heads` heads of T tokens. Its block masks are concrete arrays
    made here (compile-time evaluation: built inside a trace they would be its tracers,
    leaked through the cache)."""
    if window is None:
        head = splash.CausalMask((T, T))
    else:
        head = splash.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([head] * heads), attn_logits_soft_cap=softcap,
            interpret=interpret)


def segment_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT, *, scale: float, softcap=None,
                      window: int | None = None, interpret: bool = False) -> jax.Array:
    """[B, T, H, D] in q's dtype, as `reference.segment_attention`."""
    B, T, H, D = q_BTHD.shape
    Tp = -(-T // BLOCK) * BLOCK
    seg = jnp.where(seg_BT < 0, -1, seg_BT).astype(jnp.int32)
    q = (q_BTHD.astype(jnp.float32) * scale).astype(q_BTHD.dtype)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k_BTKD, v_BTKD))      # [B, heads, T, D]
    if Tp != T:
        pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, Tp - T)), constant_values=PAD_SEGMENT)
    kern = _kernel(H, Tp, window, float(softcap) if softcap else None, bool(interpret))
    o = jax.vmap(lambda q1, k1, v1, s1: kern(q1, k1, v1,
                                             segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
        q, k, v, seg)
    return jnp.swapaxes(o[:, :, :T], 1, 2).astype(q_BTHD.dtype)
