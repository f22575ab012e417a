"""Checks and small vector helpers the allocations share."""

from __future__ import annotations

import numpy as np
from scipy.signal import savgol_filter

from ...errors import LayerIFError

__all__ = ["as_vector", "block_means"]

# Shares are rounded to this many decimals before floor / tie-breaking, so
# that float noise (2.9999999999 for 3) cannot break an exact tie.
SHARE_DECIMALS = 9


def as_vector(x, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise LayerIFError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise LayerIFError(f"{name} is not finite at index {bad[0]} ({v[bad[0]]})")
    return v


def block_means(v: np.ndarray, per_block: int, name: str) -> np.ndarray:
    if per_block < 1 or v.size % per_block:
        raise LayerIFError(f"{name} has {v.size} entries, not a multiple of per_block={per_block}")
    return v.reshape(-1, per_block).mean(axis=1)


def minmax(a: np.ndarray) -> np.ndarray | None:
    """(a - min)/(max - min), or None where a is constant (up to 1e-12 relative)."""
    lo, hi = a.min(), a.max()
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), np.finfo(float).tiny):
        return None
    return (a - lo) / (hi - lo)


def savgol(a: np.ndarray, window: int = 7, polyorder: int = 3) -> np.ndarray:
    """Savitzky-Golay, mode "interp". Fewer than `window` layers: the largest odd
    window <= L that is > polyorder; none exists (L < 5): no smoothing."""
    w = min(window, a.size if a.size % 2 else a.size - 1)
    if w <= polyorder:
        return a
    return savgol_filter(a, w, polyorder, mode="interp")
