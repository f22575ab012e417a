"""Experts per layer for LoRA-MoE (METHOD.md section 4) and the baselines."""

from __future__ import annotations

import warnings

import numpy as np

from ...errors import LayerIFError
from .common import SHARE_DECIMALS, as_vector, block_means

__all__ = ["MOLA_PRESETS", "check_total", "expert_counts", "top_k_per_layer",
           "uniform_experts", "mola_experts", "alphalora_experts"]

MOLA_PRESETS = {
    "2-4-6-8": (2, 4, 6, 8),
    "8-6-4-2": (8, 6, 4, 2),
    "5-5-5-5": (5, 5, 5, 5),
    "8-2-2-8": (8, 2, 2, 8),
}


def check_total(num_layers: int, total: int) -> None:
    if num_layers < 1:
        raise LayerIFError(f"need at least one layer, got {num_layers}")
    if int(total) != total or total < num_layers:
        raise LayerIFError(
            f"total experts T={total} must be an integer >= the number of layers L={num_layers}"
        )


def _largest_remainder(shares: np.ndarray, base: np.ndarray, total: int) -> np.ndarray:
    """Hand out `total - sum(base)` extra units, one each, to the largest
    fractional parts of `shares` (ties: lower index first)."""
    frac = np.round(shares - np.floor(shares), SHARE_DECIMALS)
    extra = int(total - base.sum())
    order = np.argsort(-frac, kind="stable")
    out = base.copy()
    out[order[:extra]] += 1
    return out


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers >= 1 summing to `total`, proportional to `weights` (Hamilton /
    largest-remainder method). Where the floor of a share is 0 it is raised to
    1; the excess is then taken back one unit at a time from the layers most
    above their share (ties: higher index first)."""
    shares = np.round(weights * total / weights.sum(), SHARE_DECIMALS)
    base = np.maximum(np.floor(shares), 1).astype(np.int64)
    while base.sum() > total:
        over = np.where(base > 1, base - shares, -np.inf)
        base[len(over) - 1 - np.argmax(over[::-1])] -= 1
    return _largest_remainder(shares, base, total)


def expert_counts(layer_scores, total: int, beta: float = 2.5) -> np.ndarray:
    """Experts per layer from LayerIF scores S (METHOD.md section 4).

    w = S**beta, f = w / sum(w) * (T - L), s = floor(f) + 1, then the
    remaining T - sum(s) experts go one each to the largest fractional parts
    f - floor(f), ties to the lower layer index. The weights are computed in
    log space (beta*log S minus its max), so raw DataInf magnitudes (~1e11,
    beta = 3) neither overflow nor lose precision. A zero score is valid
    (weight 0: the 1-expert minimum); all scores zero falls back to uniform.

    Returns int64 counts, each >= 1, summing to `total`.
    """
    s = as_vector(layer_scores, "layer_scores")
    neg = np.flatnonzero(s < 0)
    if neg.size:
        raise LayerIFError(f"layer_scores must be >= 0; layer {neg[0]} has {s[neg[0]]}")
    if not beta > 0:
        raise LayerIFError(f"beta must be > 0, got {beta}")
    check_total(s.size, total)
    if not s.any():
        warnings.warn("all layer scores are zero: allocating experts uniformly", stacklevel=2)
        w = np.ones_like(s)
    else:
        with np.errstate(divide="ignore"):
            logw = beta * np.log(s)
        w = np.exp(logw - logw.max())
    shares = np.round(w * (total - s.size) / w.sum(), SHARE_DECIMALS)
    return _largest_remainder(shares, np.floor(shares).astype(np.int64) + 1, total)


def top_k_per_layer(counts) -> np.ndarray:
    """Router top-k per layer: 2 where a layer has more than one expert, else 1."""
    return np.where(np.asarray(counts) > 1, 2, 1)


def uniform_experts(num_layers: int, total: int) -> np.ndarray:
    """T // L experts per layer; the T mod L left over go one each to the first layers."""
    check_total(num_layers, total)
    counts = np.full(num_layers, total // num_layers, dtype=np.int64)
    counts[: total % num_layers] += 1
    return counts


def mola_experts(num_layers: int, total: int, preset: str) -> np.ndarray:
    """MoLA baseline: four contiguous groups of layers with preset expert ratios.

    Groups are `np.array_split(range(L), 4)`: when 4 does not divide L the first
    L mod 4 groups get one layer more. Each layer's count is proportional to its
    group's preset number, scaled so the counts sum exactly to T (largest
    remainders, ties to the lower layer) with every layer >= 1. For L = 32,
    T = 160 this is the preset itself (e.g. 8 layers each of 2, 4, 6, 8).
    """
    if preset not in MOLA_PRESETS:
        raise LayerIFError(f"unknown MoLA preset {preset!r}; choose from {', '.join(MOLA_PRESETS)}")
    check_total(num_layers, total)
    w = np.empty(num_layers)
    for group, p in zip(np.array_split(np.arange(num_layers), 4), MOLA_PRESETS[preset]):
        w[group] = p
    return _apportion(w, total)


def alphalora_experts(alpha, total: int, beta: float = 2.5, per_block: int = 7) -> np.ndarray:
    """AlphaLoRA baseline: `expert_counts` on the block mean of PL_Alpha_Hill.

    `alpha` is one value per matrix (`per_block` per block, e.g. the 224 values
    of alpha_peak.npy for Mistral-7B); pass per_block=1 for one value per block.
    Higher alpha (a less well-trained layer) gets more experts.
    """
    a = as_vector(alpha, "alpha")
    if per_block < 1 or a.size % per_block:
        raise LayerIFError(
            f"AlphaLoRA needs PL_Alpha_Hill values, {per_block} per block (one per matrix; "
            f"per_block=1 for one per block), got {a.size} values: compute them with "
            "`layerif alpha --model M --out alpha.json` (or layerif_jax.applications.prune.alpha_per_matrix)")
    return expert_counts(block_means(a, per_block, "alpha"), total, beta)
