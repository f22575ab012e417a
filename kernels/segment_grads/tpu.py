"""The TPU kernel (Pallas, Mosaic): one MXU matmul per (row, N tile, T tile).

For a row r the J masked copies of w^T are stacked into a [J*k, tT] left operand in
VMEM (the mask never reaches HBM) and multiplied by the x tile [tT, tN]: the x tile is
read from HBM once and pushed into the MXU once for all J examples of the row, and the
[J*k, tN] float32 block accumulates over the row's token tiles in place.

Block-shape rules of Mosaic: the last two dims of every block are multiples of (8, 128)
or the whole dim; k is padded to a multiple of 8 (zero rows of w), N and T are tiled by
multiples of 128 that divide them (else taken whole).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MAX_TILE_N = 1024
MAX_TILE_T = 512


def _tile(n: int, cap: int) -> int:
    """The largest multiple of 128 <= cap dividing n, or n itself."""
    for t in range(min(cap, n) // 128 * 128, 0, -128):
        if n % t == 0:
            return t
    return n


def _kernel(seg_ref, w_ref, x_ref, o_ref, *, num_segments: int, precision):
    @pl.when(pl.program_id(2) == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    seg = seg_ref[...]                                     # [1, tT] int32
    w = w_ref[...].astype(jnp.float32)                     # [k, tT]
    k, tT = w.shape
    j = jax.lax.broadcasted_iota(jnp.int32, (num_segments, 1, tT), 0)
    wm = jnp.where(seg[None] == j, w[None], 0.0).reshape(num_segments * k, tT)
    o_ref[...] += jnp.dot(wm, x_ref[...].astype(jnp.float32), precision=precision,
                          preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_segments", "interpret", "precision"))
def segment_outer(seg_RT, w_RTK, x_RTN, num_segments: int, *, interpret: bool = False,
                  precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """[R, J, k, N] float32, as `reference.segment_outer`."""
    R, T, k = w_RTK.shape
    N = x_RTN.shape[-1]
    kp = -(-k // 8) * 8
    wT = jnp.swapaxes(w_RTK.astype(jnp.float32), 1, 2)          # [R, k, T], skinny
    if kp != k:
        wT = jnp.pad(wT, ((0, 0), (0, kp - k), (0, 0)))
    tN, tT = _tile(N, MAX_TILE_N), _tile(T, MAX_TILE_T)
    sq = pl.Squeezed()
    out = pl.pallas_call(
        functools.partial(_kernel, num_segments=num_segments, precision=precision),
        out_shape=jax.ShapeDtypeStruct((R, num_segments * kp, N), jnp.float32),
        grid=(R, N // tN, T // tT),
        in_specs=[pl.BlockSpec((sq, 1, tT), lambda r, n, t: (r, 0, t)),
                  pl.BlockSpec((sq, kp, tT), lambda r, n, t: (r, 0, t)),
                  pl.BlockSpec((sq, tT, tN), lambda r, n, t: (r, t, n))],
        out_specs=pl.BlockSpec((sq, num_segments * kp, tN), lambda r, n, t: (r, 0, n)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * R * T * num_segments * kp * N, transcendentals=0,
            bytes_accessed=x_RTN.size * x_RTN.dtype.itemsize + wT.size * 4 + R * T * 4
            + R * num_segments * kp * N * 4),
        interpret=interpret,
        name="segment_outer",
    )(seg_RT.astype(jnp.int32)[:, None, :], wT, x_RTN)
    return out.reshape(R, num_segments, kp, N)[:, :, :k]
