"""Numeric helpers shared by the models and the influence engines (no model logic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def precision():
    """Full float32 for the influence sums: HIGHEST on GPU/TPU (no TF32 or bf16 passes);
    on CPU float32 dots are exact already and HIGHEST only selects a slower kernel."""
    return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., I] @ w[I, O] as one 2-D GEMM, accumulated in float32, cast back to x's dtype.

    2-D: XLA:CPU runs [B, T, I] @ [I, O] about 40% slower. float32 accumulation: a
    bfloat16 GEMM with a float32 result runs at twice the speed of a bfloat16 one
    there (AVX512-BF16), and is more accurate.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[-1])
