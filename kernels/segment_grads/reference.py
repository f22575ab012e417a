"""The definition, in pure JAX: segment sums of token outer products over packed rows.

    out[r, j] = sum_{t : seg[r, t] == j} w[r, t]^T x[r, t]            [k, N]

for w [R, T, k], x [R, T, N] and seg [R, T] (the example of each token within its row,
0..J-1; -1 or >= J: a token of no example). With w = s dy B^T and x the LoRA input this
is every example's gradient of A (transposed); with w = s x A and x = dy, of B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_outer(seg_RT, w_RTK, x_RTN, num_segments: int, precision=None) -> jax.Array:
    """[R, J, k, N] float32: masks on the skinny (k) side, then one contraction over the
    row's tokens (float32, `precision` for the dot)."""
    oh = (seg_RT[:, None, :] == jnp.arange(num_segments)[None, :, None]).astype(jnp.float32)
    wm = oh[..., None] * w_RTK.astype(jnp.float32)[:, None]             # [R, J, T, k]
    return jnp.einsum("rjtk,rtn->rjkn", wm, x_RTN.astype(jnp.float32), precision=precision)
