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


def segment_sum(seg_RT, s_RTM, num_segments: int) -> jax.Array:
    """out[r, j] = sum_{t : seg[r, t] == j} s[r, t]: [R, J, M] float32 (per-token scalars
    summed per example; tokens of no example dropped)."""
    oh = (seg_RT[:, None, :] == jnp.arange(num_segments)[None, :, None]).astype(jnp.float32)
    return jnp.einsum("rjt,rtm->rjm", oh, s_RTM.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def lora_scores(x_RTI, dy_RTO, seg_RT, a_IK, b_KO, ha_MIK, hb_MKO, scale: float,
                num_segments: int, precision=None) -> tuple[jax.Array, jax.Array]:
    """(h_A . dA_e, h_B . dB_e) [R, J, M] float32 for every example e = (r, j) and every
    direction m, without forming dA_e or dB_e:

        h_A . dA_e = sum_{t in e} (x_t h_A) . (s dy_t B^T)
        h_B . dB_e = sum_{t in e} (x_t A) . (s dy_t h_B^T)

    x is read by ONE GEMM against [A | h_A^1 .. h_A^M] and dy by one against
    [B | h_B^1 .. h_B^M]^T; the rest is a per-token product over the rank and a segment
    sum of scalars."""
    M, I, K = ha_MIK.shape
    f32 = jnp.float32
    right = jnp.concatenate([a_IK[None], ha_MIK], 0).astype(f32)          # [1+M, I, k]
    left = jnp.concatenate([b_KO[None], hb_MKO], 0).astype(f32)           # [1+M, k, O]
    xr = jnp.einsum("rti,nik->rtnk", x_RTI.astype(f32), right, precision=precision)
    dl = scale * jnp.einsum("rto,nko->rtnk", dy_RTO.astype(f32), left, precision=precision)
    u, xh = xr[:, :, 0], xr[:, :, 1:]                                    # x A, x h_A
    du, dyh = dl[:, :, 0], dl[:, :, 1:]                                  # s dy B^T, s dy h_B^T
    s_a = jnp.einsum("rtmk,rtk->rtm", xh, du, precision=precision)
    s_b = jnp.einsum("rtmk,rtk->rtm", dyh, u, precision=precision)
    return segment_sum(seg_RT, s_a, num_segments), segment_sum(seg_RT, s_b, num_segments)
