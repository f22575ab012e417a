"""The GPU kernel: JAX's own Pallas (Triton) flash attention with segment ids
(jax.experimental.pallas.ops.gpu.attention.mha), not a rewrite of it.

`mha` takes [B, T, H, D] queries, keys and values with the same number of heads, a causal
flag and segment ids [B, T]; its forward keeps the output and the log-sum-exp per query,
its backward is its own dq / dk / dv kernels (a custom_vjp). Grouped-query heads are
repeated to H here (the backward of the repeat sums each group's dk and dv). T is padded
to a multiple of the block (128) with tokens of a segment no real token has. It has no
sliding window and no softcap: the entry point (`__init__.py`) runs the reference for a
layer that needs them (a window of at least T is no window at all and takes the kernel).

Precision: Triton runs float32 dots as TF32 (10-bit mantissa inputs) unless told
otherwise, and `mha` does not ask; so do XLA:GPU's default-precision float32 GEMMs of
the rest of the model. bfloat16, what 7B runs use, is unaffected.

Where it is deprecated (jax 0.12 warns, pointing to tokamax, which needs Python 3.12 and
jax >= 0.11) and if it is ever removed, `available()` says so and the entry point keeps
the reference on GPUs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import jax
import jax.numpy as jnp

MODULE = "jax.experimental.pallas.ops.gpu.attention"
BLOCK = 128   # mha's default forward blocks (its backward's: 32)
PAD_SEGMENT = -2   # the segment of the tokens padding T to a multiple of BLOCK


@functools.lru_cache(maxsize=1)
def _mha_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(MODULE)
    except ImportError:
        return None


def available() -> bool:
    """Whether this jax ships the Pallas GPU flash attention (found, not imported)."""
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ImportError:
        return False


def segment_attention(q_BTHD, k_BTKD, v_BTKD, seg_BT, *, scale: float,
                      interpret: bool = False) -> jax.Array:
    """[B, T, H, D] in q's dtype, as `reference.segment_attention` without window or
    softcap."""
    mha = _mha_module()
    B, T, H, D = q_BTHD.shape
    G = H // k_BTKD.shape[2]
    Tp = -(-T // BLOCK) * BLOCK
    seg = jnp.where(seg_BT < 0, -1, seg_BT).astype(jnp.int32)
    q, k, v = q_BTHD, k_BTKD, v_BTKD
    if G > 1:
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, Tp - T)), constant_values=PAD_SEGMENT)
    o = mha.mha(q, k, v, seg, sm_scale=float(scale), causal=True,
                block_sizes=mha.BlockSizes.get_default(), interpret=bool(interpret))
    return o[:, :T].astype(q_BTHD.dtype)
