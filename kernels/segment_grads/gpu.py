"""The GPU kernel (Pallas, Mosaic GPU, Hopper: H100/H200, sm_90a): tensor-core (wgmma)
matmuls of the row's stacked masked w^T against its x tiles.

One CUDA block (one warpgroup, 128 threads) per (row, N tile, example group). It runs over
the row's token tiles in a TMA pipeline (`plgpu.emit_pipeline`, up to 4 tiles in flight):
each x tile [tT, tN] is read from HBM once, for all J examples of the row. For each token
tile the J masked copies of w^T are built in registers from the tile's seg [tT] and w^T
[k, tT] (its two bf16 parts, split in XLA: as small as w), stacked as the [M, tT] left
operand (row m = (example j, rank c) = (m // k, m % k); M = the block's examples times k,
rounded up to 64) and stored in shared memory; the mask never reaches HBM. The [M, tN]
float32 accumulator stays in registers over all token tiles and is written out once.

Precision (wgmma has no float32 operands: bf16, or tf32 with a 10-bit mantissa): w is
split in two bf16 parts, w = w_hi + w_lo + d with |d| <= 2^-16 |w|, and both run through
the tensor cores against the same x tile, accumulating in float32. bfloat16 x is exact in
bf16, so each term w_t^T x_t carries a relative error of at most 2^-16 (a 16-bit mantissa
of w); float32 x (other float dtypes are cast to float32) is split in-kernel the same way
and three products run (hi.hi, lo.hi, hi.lo; lo.lo is dropped): at most 3 2^-16 per term.
On top of that, float32 accumulation over the row's tokens. (The TPU kernel's float32
HIGHEST is ~2^-24 per term; rounding w to bf16 once would be 2^-9.)

Tiles: tT = 64 tokens (one 128-byte swizzle of bf16), tN = 128 columns (64 when N is not
a multiple of 128); examples are grouped so that M <= 128 (the grid's third axis; x is
read once per group, one group whenever J*k <= 128). T and N that are not multiples of 64
are padded with zeros in XLA (a copy of x: avoid in the hot path). Shared memory per block
(`plan`; the compiler's count is within 1 KiB of it): for bf16 x, M = 64, k = 8: 4 x 18 KiB
of x, w and seg tiles in flight, 2 x 8 KiB of stacked operand, 32 KiB of output staging:
121 KiB; float32 x: 2 x 34 KiB in flight plus 32 KiB of its bf16 parts: 148 KiB; M = 128
adds 48 KiB. Fewer tiles are kept in flight where a large rank would pass the H100/H200's
227 KiB. Building the stacked operand costs k selects per element on the CUDA cores: the
kernel is written for LoRA ranks (8-16); it stays correct, not fast, for large k.

Every entry point takes `interpret`: run it in Mosaic GPU's interpreter (any backend, how
it is tested on CPU; it simulates the threads, shared memory, TMA copies and wgmma).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

try:                                     # exported by jax 0.12
    from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
except ImportError:                      # jax 0.10: only in jax._src
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

TILE_T = 64          # tokens per step: one 128-byte swizzle of bf16 (wgmma's K granule)
MAX_M = 128          # rows of the stacked operand (examples x rank) per block
STAGES = {jnp.dtype(jnp.bfloat16): 4, jnp.dtype(jnp.float32): 2}   # x tiles in flight
SMEM_LIMIT = 227 * 1024                  # per block on H100/H200 (sm_90)
SMEM_BUDGET = SMEM_LIMIT - 4096          # room for the pipeline's barriers


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _smem(dtype, rows: int, cols: int):
    """A shared-memory tile in the tiled, 128-byte-swizzled layout wgmma and TMA use."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def plan(T: int, N: int, k: int, J: int, x_dtype) -> dict:
    """The kernel's tiles and shared-memory use for one call's shapes."""
    if k > MAX_M:
        raise ValueError(f"segment_outer (GPU): rank {k} > {MAX_M} is not supported")
    xdt = jnp.dtype(jnp.bfloat16 if jnp.dtype(x_dtype) == jnp.bfloat16 else jnp.float32)
    Tp, Np = _round_up(T, TILE_T), _round_up(N, 64)
    tN = 128 if Np % 128 == 0 else 64
    per_group = min(J, MAX_M // k)
    groups = -(-J // per_group)
    M = _round_up(per_group * k, 64)
    per_stage = TILE_T * tN * xdt.itemsize + 2 * k * TILE_T * 2 + TILE_T * 4
    fixed = 2 * M * TILE_T * 2 + M * tN * 4 + (2 * TILE_T * tN * 2 if xdt == jnp.float32 else 0)
    stages = min(STAGES[xdt], Tp // TILE_T)          # fewer in flight where a large rank
    while stages > 1 and fixed + stages * per_stage > SMEM_BUDGET:   # leaves no room
        stages -= 1
    smem = fixed + stages * per_stage
    if smem > SMEM_BUDGET:
        raise ValueError(f"segment_outer (GPU): {smem} bytes of shared memory for rank {k}, "
                         f"{J} examples (at most {SMEM_BUDGET})")
    return dict(Tp=Tp, Np=Np, tN=tN, per_group=per_group, groups=groups, M=M,
                stages=stages, x_dtype=xdt, smem_bytes=smem)


def _kernel(seg_g, wh_g, wl_g, x_g, out_g, a_hi, a_lo, out_s, *x_parts, k: int, J: int,
            per_group: int, M: int, tN: int, stages: int, steps: int, split_x: bool):
    r, n, g = lax.axis_index("r"), lax.axis_index("n"), lax.axis_index("g")
    shape = (M, TILE_T)

    def stacked(seg_s, wh_s, wl_s):
        """a_hi / a_lo [M, tT] <- row m: w[:, m % k] where seg == (its example), else 0."""
        rows = lax.broadcasted_iota(jnp.int32, shape, 0)
        j = g * per_group + rows // k
        mask = ((rows < per_group * k) & (j < J)
                & (lax.broadcast_in_dim(seg_s[...], shape, [1]) == j))
        c = rows % k
        hi = lo = jnp.zeros(shape, jnp.float32)
        for i in range(k):                       # row m takes rank m % k of w
            hi = jnp.where(c == i, lax.broadcast_in_dim(
                wh_s[i].astype(jnp.float32), shape, [1]), hi)
            lo = jnp.where(c == i, lax.broadcast_in_dim(
                wl_s[i].astype(jnp.float32), shape, [1]), lo)
        a_hi[...] = jnp.where(mask, hi, 0.0).astype(jnp.bfloat16)
        a_lo[...] = jnp.where(mask, lo, 0.0).astype(jnp.bfloat16)

    def body(acc, _, seg_s, wh_s, wl_s, x_s):
        stacked(seg_s, wh_s, wl_s)
        if split_x:                              # float32 x: two bf16 parts in SMEM
            x_hi, x_lo = x_parts
            xv = x_s[...]
            xh = xv.astype(jnp.bfloat16)
            x_hi[...] = xh
            x_lo[...] = (xv - xh.astype(jnp.float32)).astype(jnp.bfloat16)
        else:
            x_hi = x_s
        plgpu.commit_smem()                      # the stores, visible to the tensor cores
        plgpu.wgmma(acc, a_hi, x_hi)
        plgpu.wgmma(acc, a_lo, x_hi)
        if split_x:
            plgpu.wgmma(acc, a_hi, x_lo)
        plgpu.wgmma_wait(0)                      # a_* and the x slot are reused next

    def with_acc(acc):
        plgpu.emit_pipeline(
            functools.partial(body, acc), grid=(steps,),
            in_specs=[plgpu.BlockSpec((TILE_T,), lambda t: (t,)),
                      plgpu.BlockSpec((k, TILE_T), lambda t: (0, t)),
                      plgpu.BlockSpec((k, TILE_T), lambda t: (0, t)),
                      plgpu.BlockSpec((TILE_T, tN), lambda t: (t, 0),
                                      transforms=_smem(x_g.dtype, TILE_T, tN))],
            max_concurrent_steps=stages,
        )(seg_g.at[r], wh_g.at[r], wl_g.at[r], x_g.at[r, :, pl.ds(n * tN, tN)])
        return acc[...]

    out_s[...] = pl.run_scoped(with_acc, plgpu.ACC((M, tN), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, out_g.at[r, pl.ds(g * M, M), pl.ds(n * tN, tN)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("num_segments", "interpret"))
def segment_outer(seg_RT, w_RTK, x_RTN, num_segments: int, *,
                  interpret: bool = False) -> jax.Array:
    """[R, J, k, N] float32, as `reference.segment_outer` (to the precision in the module
    docstring)."""
    R, T, k = w_RTK.shape
    N = x_RTN.shape[-1]
    J = num_segments
    p = plan(T, N, k, J, x_RTN.dtype)
    Tp, Np, tN, M, G = p["Tp"], p["Np"], p["tN"], p["M"], p["groups"]
    seg = seg_RT.astype(jnp.int32)
    wT = jnp.swapaxes(w_RTK.astype(jnp.float32), 1, 2)             # [R, k, T], skinny
    x = x_RTN.astype(p["x_dtype"])
    if Tp != T or Np != N:
        seg = jnp.pad(seg, ((0, 0), (0, Tp - T)), constant_values=-1)
        wT = jnp.pad(wT, ((0, 0), (0, 0), (0, Tp - T)))
        x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, Np - N)))
    w_hi = wT.astype(jnp.bfloat16)
    w_lo = (wT - w_hi.astype(jnp.float32)).astype(jnp.bfloat16)
    split_x = p["x_dtype"] == jnp.float32
    bf16_tile = plgpu.SMEM((M, TILE_T), jnp.bfloat16, transforms=_smem(jnp.bfloat16, M, TILE_T))
    scratch = [bf16_tile, bf16_tile, plgpu.SMEM((M, tN), jnp.float32)]
    if split_x:
        scratch += [plgpu.SMEM((TILE_T, tN), jnp.bfloat16,
                               transforms=_smem(jnp.bfloat16, TILE_T, tN))] * 2
    out = plgpu.kernel(
        functools.partial(_kernel, k=k, J=J, per_group=p["per_group"], M=M, tN=tN,
                          stages=p["stages"], steps=Tp // TILE_T, split_x=split_x),
        out_type=jax.ShapeDtypeStruct((R, G * M, Np), jnp.float32),
        grid=(R, Np // tN, G), grid_names=("r", "n", "g"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=InterpretGPUParams() if interpret else None,
    )(seg, w_hi, w_lo, x)
    Jg = p["per_group"]
    out = out.reshape(R, G, M, Np)
    if M != Jg * k:
        out = out[:, :, :Jg * k]
    out = out.reshape(R, G * Jg, k, Np)
    if G * Jg != J or Np != N:
        out = out[:, :J, :, :N]
    return out
