"""Segment-summed per-example LoRA gradients of packed rows, read from x and dy once.

For a LoRA map y = x W + s (x A) B over packed rows (seg: the example of each token
within its row), every example e's gradients are

    dA_e = s * sum_{t in e} x_t^T (dy_t B^T)       dB_e = s * sum_{t in e} (x_t A)^T dy_t

both `segment_outer(seg, w, x)` = sum_{t in e} w_t^T x_t with a skinny (rank-k) w. The
reference forms the J masked copies of w in HBM and contracts ([R, J, T, k]); the kernels
build them on-chip and read each x tile once for all J examples of its row: the TPU kernel
in VMEM, one float32 (HIGHEST) MXU matmul per tile (tpu.py); the GPU kernel for Hopper
(H100/H200, Mosaic GPU) in shared memory, bf16 wgmma tensor-core matmuls with w split in
two bf16 parts (float32 x: x too), ~2^-16 relative per token term instead of float32's
2^-24 (gpu.py). Platforms: "tpu"; "cuda" (what an ahead-of-time compile for an NVIDIA GPU
passes; on a machine with a GPU jax's "gpu" means "cuda" when the GPU is a Hopper, and
stays "gpu", with no kernel, otherwise: wgmma is Hopper's). The backward is the
reference's VJP on every platform.

`lora_scores` gives h . g_e for fixed directions h without forming g_e at all (the
score pass of an estimator whose scores are dot products with one IHVP per validation
vector): two GEMMs that read x and dy once each, a per-token product over the rank and a
segment sum of scalars. It has no Pallas kernel: XLA runs it as those GEMMs already, and a
kernel would fuse only the [R, T, M] scalar sums (measured in benchmarks/plan_mistral.py
--score-pass: see the README).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from layerif_jax.kernels.switch import local_platform, resolve
from . import reference, tpu

KERNEL_PLATFORMS = ("tpu", "cuda")
GPU_PLATFORMS = ("cuda",)


def _platform(platform: str | None) -> str:
    """jax's local "gpu" is "cuda" on a Hopper (compute capability 9.x: wgmma)."""
    return local_platform(platform, (9,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _outer(seg, w, x, num_segments, impl, interpret, platform, precision):
    if impl == "reference":
        return reference.segment_outer(seg, w, x, num_segments, precision)
    if platform in GPU_PLATFORMS:     # its own fixed precision (gpu.py): `precision` unused
        from . import gpu             # Mosaic GPU: imported only when a trace needs it
        kernel = functools.partial(gpu.segment_outer, num_segments=num_segments,
                                   interpret=interpret)
        if interpret:
            return kernel(seg, w, x)
        # the kernel where the program is compiled for an NVIDIA GPU; the reference where
        # the same trace is compiled for another backend (e.g. a plan's XLA:CPU FLOP count
        # of a step traced for "cuda": Mosaic GPU has no CPU lowering)
        return jax.lax.platform_dependent(
            seg, w, x, cuda=kernel,
            default=lambda s, w_, x_: reference.segment_outer(s, w_, x_, num_segments,
                                                              precision))
    return tpu.segment_outer(seg, w, x, num_segments, interpret=interpret,
                             precision=precision or jax.lax.Precision.HIGHEST)


def _outer_fwd(seg, w, x, num_segments, impl, interpret, platform, precision):
    return _outer(seg, w, x, num_segments, impl, interpret, platform, precision), (seg, w, x)


def _outer_bwd(num_segments, impl, interpret, platform, precision, res, c):
    # bilinear in (w, x): the reference's own VJP, which never forms a per-token [k, N]
    seg, w, x = res
    _, vjp = jax.vjp(lambda w_, x_: reference.segment_outer(seg, w_, x_, num_segments,
                                                            precision), w, x)
    dw, dx = vjp(c)
    return np.zeros(seg.shape, jax.dtypes.float0), dw.astype(w.dtype), dx.astype(x.dtype)


_outer.defvjp(_outer_fwd, _outer_bwd)


def segment_outer(seg_RT, w_RTK, x_RTN, num_segments: int, *, impl: str | None = None,
                  interpret: bool | None = None, platform: str | None = None,
                  precision=None) -> jax.Array:
    """out[r, j] = sum_{t: seg[r, t] == j} w[r, t]^T x[r, t]: [R, J, k, N] float32.

    seg [R, T] int (tokens with seg outside 0..J-1 belong to no example), w [R, T, k],
    x [R, T, N] (any float dtype; the sums run in float32). Differentiable in w and x.
    impl / interpret: see `switch.use`; platform: what the trace is compiled for (None:
    jax's default backend; an ahead-of-time compile for a TPU passes "tpu", for an NVIDIA
    GPU "cuda"). The kernel of the platform runs: the GPU kernel for "cuda", else the TPU
    kernel (interpret=True on a CPU: the TPU kernel unless platform="cuda").
    """
    platform = _platform(platform)
    impl, interpret = resolve(impl, interpret, platform, KERNEL_PLATFORMS)
    if seg_RT.ndim != 2 or w_RTK.shape[:2] != seg_RT.shape or x_RTN.shape[:2] != seg_RT.shape:
        raise ValueError(f"segment_outer: seg [R, T], w [R, T, k] and x [R, T, N] must share "
                         f"R and T, got {seg_RT.shape}, {w_RTK.shape}, {x_RTN.shape}")
    return _outer(seg_RT, w_RTK, x_RTN, num_segments, impl, interpret, platform,
                  precision)


def lora_grads(x_RTI, dy_RTO, seg_RT, a_IK, b_KO, scale: float, num_segments: int,
               **kw) -> tuple[jax.Array, jax.Array]:
    """(dA [R, J, I, k], dB [R, J, k, O]) float32: every example's LoRA gradients of one
    map, from its input x and output gradient dy (see the module docstring)."""
    prec = kw.get("precision")
    xf, dyf = x_RTI.astype(jnp.float32), dy_RTO.astype(jnp.float32)
    u = jnp.einsum("rti,ik->rtk", xf, a_IK.astype(jnp.float32), precision=prec)
    du = scale * jnp.einsum("rto,ko->rtk", dyf, b_KO.astype(jnp.float32), precision=prec)
    gA = jnp.swapaxes(segment_outer(seg_RT, du, x_RTI, num_segments, **kw), -1, -2)
    gB = segment_outer(seg_RT, scale * u, dy_RTO, num_segments, **kw)
    return gA, gB


def lora_scores(x_RTI, dy_RTO, seg_RT, a_IK, b_KO, ha_MIK, hb_MKO, scale: float,
                num_segments: int, precision=None) -> tuple[jax.Array, jax.Array]:
    """(h_A . dA_e, h_B . dB_e) [R, J, M] float32: every example's LoRA gradients of one
    map dotted with M directions (h_A [M, I, k], h_B [M, k, O]), never formed; see
    `reference.lora_scores`."""
    if ha_MIK.shape[1:] != a_IK.shape or hb_MKO.shape[1:] != b_KO.shape:
        raise ValueError(f"lora_scores: directions {ha_MIK.shape}, {hb_MKO.shape} do not "
                         f"match the factors {a_IK.shape}, {b_KO.shape}")
    return reference.lora_scores(x_RTI, dy_RTO, seg_RT, a_IK, b_KO, ha_MIK, hb_MKO, scale,
                                 num_segments, precision)
