"""Causal attention inside each example of packed rows (segment ids), grouped-query.

A packed row holds several examples back to back; each token may attend only to the
earlier tokens of its own example (and, with a sliding window, only the last `window`
of them). The dense reference masks the full [T, T] scores of every row (reference.py);
on a TPU JAX's own splash attention runs it with segment ids (tpu.py), so the scores and
probabilities never reach HBM and the blocks above the diagonal are skipped; on an NVIDIA
GPU (Ampere or newer: "cuda") JAX's own Pallas/Triton flash attention with segment ids
does the same (gpu.py), except for a sliding window shorter than the row or a softcap,
which it does not have: those calls run the reference there.

The decoder calls this when `switch.resolve` picks the kernel for the target platform
(`layerif_jax.models.decoder.attention`); otherwise it keeps its own dense path, which
is this reference laid out for XLA:CPU.
"""

from __future__ import annotations

import functools
import math

import jax

from layerif_jax.kernels.switch import local_platform, resolve
from . import gpu, reference, tpu

GPU_PLATFORMS = ("cuda",)
KERNEL_PLATFORMS = ("tpu",) + (GPU_PLATFORMS if gpu.available() else ())


def target(platform: str | None = None) -> str:
    """The platform name a trace for `platform` (None: jax's default backend) is for;
    jax's local "gpu" is "cuda" from Ampere (compute capability 8) on: Triton's flash
    attention runs there."""
    return local_platform(platform, tuple(range(8, 13)))


def segment_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT, *, scale: float | None = None,
                      softcap: float | None = None, window: int | None = None,
                      impl: str | None = None, interpret: bool | None = None,
                      platform: str | None = None) -> jax.Array:
    """[B, T, H, D] in q's dtype: q [B, T, H, D], k and v [B, T, K, D] (H a multiple of
    K), seg [B, T] int (the example of each token; negative: padding). scale: of the
    scores (default 1/sqrt(D)); softcap: cap * tanh(s / cap) of the scaled scores;
    window: keys at most window - 1 tokens back. Differentiable in q, k and v.
    impl / interpret / platform: see `switch.use` and `kernels.segment_grads`; the kernel
    of the platform runs (interpreted on a CPU: splash unless platform="cuda")."""
    platform = target(platform)
    impl, interpret = resolve(impl, interpret, platform, KERNEL_PLATFORMS)
    B, T, H, D = q_BTHD.shape
    if (k_BTKD.shape[:2] != (B, T) or v_BTKD.shape != k_BTKD.shape or k_BTKD.shape[3] != D
            or H % k_BTKD.shape[2] or seg_BT.shape != (B, T)):
        raise ValueError(f"segment_attention: q [B, T, H, D], k and v [B, T, K, D] with K "
                         f"dividing H, seg [B, T]; got {q_BTHD.shape}, {k_BTKD.shape}, "
                         f"{v_BTKD.shape}, {seg_BT.shape}")
    if window is not None and window < 1:
        raise ValueError(f"segment_attention: window must be at least 1, got {window}")
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    ref = functools.partial(reference.segment_attention, scale=scale, softcap=softcap,
                            window=window)
    if impl == "reference":
        return ref(q_BTHD, k_BTKD, v_BTKD, seg_BT)
    if platform in GPU_PLATFORMS:
        if softcap or (window is not None and window < T) or not gpu.available():
            return ref(q_BTHD, k_BTKD, v_BTKD, seg_BT)     # the GPU kernel has neither
        kernel = functools.partial(gpu.segment_attention, scale=scale, interpret=interpret)
        if interpret:
            return kernel(q_BTHD, k_BTKD, v_BTKD, seg_BT)
        # the kernel where the program is compiled for an NVIDIA GPU, the reference where
        # the same trace is compiled for another backend (Triton has no CPU lowering)
        return jax.lax.platform_dependent(q_BTHD, k_BTKD, v_BTKD, seg_BT, cuda=kernel,
                                          default=ref)
    return tpu.segment_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT, scale=scale, softcap=softcap,
                                 window=window, interpret=interpret)
