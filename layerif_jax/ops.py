"""Numeric helpers shared by the models and the influence engines (no model logic)."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

# What a trace is lowered for: (platform or None = jax's default backend, unroll the
# layer scan). Set only while an ahead-of-time plan traces (`compiling_for`).
_TARGET: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar(
    "layerif_target", default=(None, False))


@contextlib.contextmanager
def compiling_for(platform: str, *, unroll_layers: bool = False):
    """Trace for `platform` ("tpu", "cuda", "cpu") rather than the default backend, e.g.
    an ahead-of-time compile for a TPU from a CPU process: `precision()` answers for that
    platform. unroll_layers: the decoders unroll their layer scan (a compiler's cost
    analysis counts a loop body once; see `influence.plan`)."""
    token = _TARGET.set((platform, unroll_layers))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    return _TARGET.get()[0] or jax.default_backend()


def unroll_layers() -> bool:
    return _TARGET.get()[1]


REMAT = ("full", "mlp")
_REMAT: contextvars.ContextVar[str | None] = contextvars.ContextVar("layerif_remat",
                                                                    default=None)


def remat_mode(on) -> str | None:
    """False/None -> None; True -> "mlp" (the default policy); "full" | "mlp" as given."""
    if on is None or on is False:
        return None
    if on is True:
        return "mlp"
    if on not in REMAT:
        raise ValueError(f"remat must be True, False or one of {', '.join(REMAT)}, got {on!r}")
    return on


@contextlib.contextmanager
def layer_remat(on=True):
    """While a program is traced: the decoders rematerialise their blocks in the backward
    (`jax.checkpoint` of the layer scan's body) instead of keeping every block's
    activations. "full": nothing inside a block is kept, only the residual stream between
    blocks, and the whole forward is recomputed once (about +50% FLOPs for LoRA, whose
    backward costs about one forward). "mlp" (True): the attention half's projections and
    output are kept, the MLP half (its two big input maps and the gated product) is
    recomputed: about +25% FLOPs for a fraction of the memory. Enter it inside the traced
    function: jax's trace caches do not see it."""
    token = _REMAT.set(remat_mode(on))
    try:
        yield
    finally:
        _REMAT.reset(token)


def remat_layers() -> str | None:
    """None, "full" or "mlp" (`layer_remat`)."""
    return _REMAT.get()


def precision():
    """Full float32 for the influence sums: HIGHEST on GPU/TPU (no TF32 or bf16 passes);
    on CPU float32 dots are exact already and HIGHEST only selects a slower kernel."""
    return None if target_platform() == "cpu" else jax.lax.Precision.HIGHEST


def mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., I] @ w[I, O] as one 2-D GEMM, accumulated in float32, cast back to x's dtype.

    2-D: XLA:CPU runs [B, T, I] @ [I, O] about 40% slower. float32 accumulation: a
    bfloat16 GEMM with a float32 result runs at twice the speed of a bfloat16 one
    there (AVX512-BF16), and is more accurate.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[-1])
