"""Pruning masks (True = pruned): magnitude, Wanda, N:M, selected exactly and fast."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ...errors import LayerIFError

__all__ = ["PRECISION", "check_nm", "check_sparsity", "check_weight", "lowest_k_flat",
           "lowest_k_cols", "lowest_nm", "magnitude_score", "wanda_score", "magnitude_mask",
           "wanda_mask", "count_zeros", "apply_mask"]

PRECISION = jax.lax.Precision.HIGHEST


def check_nm(nm, d_in: int | None = None, what: str = "weight") -> tuple[int, int]:
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise LayerIFError(f"N:M must be a pair of integers like (2, 4), got {nm!r}") from None
    if not (m >= 2 and 1 <= n < m):
        raise LayerIFError(f"N:M pattern {n}:{m} is invalid: need 1 <= N < M")
    if d_in is not None and d_in % m:
        raise LayerIFError(f"{what} has {d_in} inputs, not divisible by M={m} for {n}:{m} pruning")
    return n, m


def check_sparsity(sparsity, nm) -> float | None:
    """The sparsity to use (None under N:M)."""
    if nm is not None:
        n, m = check_nm(nm)
        if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
            raise LayerIFError(f"{n}:{m} pruning fixes the sparsity at {n / m:g}, "
                               f"got sparsity {sparsity}")
        return None
    if sparsity is None:
        raise LayerIFError("sparsity is required (or give nm=(N, M))")
    s = float(sparsity)
    if not 0 < s < 1:
        raise LayerIFError(f"sparsity must be in (0, 1), got {sparsity}")
    return s


def check_weight(W, what="weight") -> jax.Array:
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise LayerIFError(f"{what} must be a 2-D kernel [d_in, d_out], got shape {W.shape}")
    return W


def rank(x: jax.Array, axis: int) -> jax.Array:
    """0-based rank of each entry along `axis` (stable: ties by position)."""
    return jnp.argsort(jnp.argsort(x, axis=axis, stable=True), axis=axis, stable=True)


def lowest_k(score: jax.Array, k, axis: int | None = None) -> jax.Array:
    """Mask of the k smallest entries of a NON-NEGATIVE score (over all entries, or along
    `axis` for every other index); ties go to the earlier position, as a stable sort would.

    Selection without sorting: for non-negative floats the int32 bit patterns are
    ordered like the values, so the k-th smallest value is found exactly by bisection
    on the bit pattern (31 vectorised counting passes, O(31 n)); XLA's CPU sort of a
    million entries is ~50x slower. k may be traced (no recompilation per sparsity).
    """
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32) + 0.0, jnp.int32)  # -0 -> +0
    red = dict(axis=axis, keepdims=axis is not None)
    k = jnp.asarray(k, jnp.int32)
    lo = jnp.full(jnp.sum(bits, **red).shape, -1, jnp.int32)
    hi = jnp.full_like(lo, 0x7F800000)  # +inf: count(bits <= hi) = n >= k

    def halve(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, **red) >= k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, t = jax.lax.fori_loop(0, 31, halve, (lo, hi))  # t: bit pattern of the k-th smallest
    below = bits < t
    tie = bits == t
    need = k - jnp.sum(below, **red)
    if axis is None:
        order = jnp.cumsum(tie.reshape(-1)).reshape(tie.shape)
    else:
        order = jnp.cumsum(tie, axis=axis)
    return below | (tie & (order <= need))


@jax.jit
def lowest_k_flat(score: jax.Array, k) -> jax.Array:
    return lowest_k(score, k)


@jax.jit
def lowest_k_cols(score: jax.Array, k) -> jax.Array:
    return lowest_k(score, k, axis=0)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def lowest_nm(score: jax.Array, n: int, m: int) -> jax.Array:
    d_in, d_out = score.shape
    g = score.reshape(d_in // m, m, d_out)
    return (rank(g, 1) < n).reshape(d_in, d_out)


def magnitude_score(W) -> jax.Array:
    return jnp.abs(W.astype(jnp.float32))


def wanda_score(W, act_norm) -> jax.Array:
    a = jnp.asarray(act_norm, jnp.float32)
    if a.shape != (W.shape[0],):
        raise LayerIFError(f"act_norm must have one entry per input ({W.shape[0]}), "
                           f"got shape {a.shape}")
    return jnp.abs(W.astype(jnp.float32)) * a[:, None]


def magnitude_mask(W, sparsity: float | None = None, *, nm=None) -> jax.Array:
    """Prune the `round(s * W.size)` smallest |W| of the matrix (or N:M per output)."""
    W = check_weight(W)
    s = check_sparsity(sparsity, nm)
    if nm is not None:
        n, m = check_nm(nm, W.shape[0])
        return lowest_nm(magnitude_score(W), n, m)
    return lowest_k_flat(magnitude_score(W), int(round(s * W.size)))


def wanda_mask(W, act_norm, sparsity: float | None = None, *, nm=None) -> jax.Array:
    """Wanda: score |W_ij| * ||X_i||_2; prune the `round(s * d_in)` lowest of each output."""
    W = check_weight(W)
    s = check_sparsity(sparsity, nm)
    score = wanda_score(W, act_norm)
    if nm is not None:
        n, m = check_nm(nm, W.shape[0])
        return lowest_nm(score, n, m)
    return lowest_k_cols(score, int(round(s * W.shape[0])))


@jax.jit
def count_zeros(W):
    return jnp.sum(W == 0)


def apply_mask(W, mask):
    """(W with the masked weights zeroed, number masked, number of zeros) -- the zeros
    counted after the fact, so a mask that misses a weight is caught."""
    Wn = jnp.where(mask, jnp.zeros((), W.dtype), W)
    return Wn, jnp.sum(mask), jnp.sum(Wn == 0)
