"""Sparsity per prunable matrix (METHOD.md section 5) and the baselines."""

from __future__ import annotations

import warnings

import numpy as np

from ...errors import LayerIFError
from .common import minmax, savgol, as_vector, block_means

__all__ = ["SCHEMES", "check_sparsity_args", "sparsity_ratios", "owl_sparsities",
           "layer_sparsities"]

SCHEMES = ("layerif", "reversed", "uniform", "alphapruning", "owl")


def check_sparsity_args(target: float, epsilon: float, clip: float) -> None:
    if not 0 < target < 1:
        raise LayerIFError(f"target sparsity must be in (0, 1), got {target}")
    if not 0 <= epsilon < 1:
        raise LayerIFError(f"epsilon must be in [0, 1), got {epsilon}")
    if not 0 < clip <= 1:
        raise LayerIFError(f"clip must be in (0, 1], got {clip}")


def _param_counts(param_counts, per_block: int) -> np.ndarray:
    d = as_vector(param_counts, "param_counts")
    if (d <= 0).any():
        raise LayerIFError("param_counts must all be > 0")
    if per_block < 1 or d.size % per_block:
        raise LayerIFError(f"param_counts has {d.size} entries, not a multiple of per_block={per_block}")
    return d


def _per_block(scores, d: np.ndarray, per_block: int, name: str) -> np.ndarray:
    """One value per block: `scores` per block as given, or per matrix averaged per block."""
    s = as_vector(scores, name)
    num_layers = d.size // per_block
    if s.size == d.size:
        return block_means(s, per_block, name)
    if s.size != num_layers:
        raise LayerIFError(
            f"{name} has {s.size} entries but param_counts implies {num_layers} blocks "
            f"({d.size} matrices): give {num_layers} or {d.size} values"
        )
    return s


def _linear_map(metric: np.ndarray, d: np.ndarray, target: float, epsilon: float,
                per_block: int, *, smooth: bool, invert: bool, clip: float) -> np.ndarray:
    """Steps 1-6 of METHOD.md section 5 on one metric value per block."""
    a = minmax(metric)
    if a is not None and smooth:
        a = minmax(savgol(a))
    if a is None:
        warnings.warn("layer metric is constant: returning uniform sparsity", stacklevel=3)
        return np.full(d.size, min(float(target), clip))
    if invert:
        a = 1.0 - a
    r = np.repeat(a * 2 * epsilon + (1 - epsilon), per_block)
    eta = target * d.sum() / (d * r).sum()
    return np.minimum(eta * r, clip)


def sparsity_ratios(layer_scores, param_counts, target: float, epsilon: float,
                    smooth: bool = True, clip: float = 0.99, *, per_block: int = 7) -> np.ndarray:
    """LayerIF sparsity per prunable matrix (METHOD.md section 5).

    a = |S| min-max normalised; optionally Savitzky-Golay smoothed (window 7,
    order 3, mode "interp"; for L < 7 the largest odd window <= L above the
    order, and no smoothing for L < 5) and normalised again;
    r = a * 2 eps + (1 - eps) broadcast to the block's `per_block` matrices;
    sparsity = eta * r with eta = target * sum(d) / sum(d * r), so the
    parameter-weighted mean sparsity equals `target` before clipping at `clip`.
    High S gets more sparsity.

    `layer_scores` holds one value per block, or one per matrix (as the paper's
    IF-300-96.npy); per-matrix values are averaged per block first, as the
    reference code does. `param_counts` holds d_k for every matrix in model
    order. Constant scores give uniform sparsity = target, with a warning.
    """
    check_sparsity_args(target, epsilon, clip)
    d = _param_counts(param_counts, per_block)
    s = np.abs(_per_block(layer_scores, d, per_block, "layer_scores"))
    return _linear_map(s, d, target, epsilon, per_block, smooth=smooth, invert=False, clip=clip)


def owl_sparsities(outlier_ratios, target: float, lam: float = 0.08, per_block: int = 7) -> np.ndarray:
    """OWL sparsity per matrix from one outlier ratio D_l per block.

    As in OWL's code (luuyin/OWL, `prune_wanda_outlier`):
    density = (D - min D) / (max D - min D) * 2 lam, shifted so that its PLAIN
    mean over blocks is 1 - target; sparsity = 1 - density, repeated for the
    block's `per_block` matrices. Layers with more outliers get LOWER sparsity;
    the sparsities span exactly 2 lam and average (plainly, over blocks) to
    `target`; with equal-sized blocks that is the parameter-weighted mean too.
    Constant D gives uniform sparsity = target, with a warning.
    """
    if not 0 < target < 1:
        raise LayerIFError(f"target sparsity must be in (0, 1), got {target}")
    if not lam >= 0:
        raise LayerIFError(f"lam must be >= 0, got {lam}")
    D = as_vector(outlier_ratios, "outlier_ratios")
    x = minmax(D)
    if x is None:
        warnings.warn("outlier ratios are constant: returning uniform sparsity", stacklevel=2)
        return np.full(D.size * per_block, float(target))
    density = x * 2 * lam
    density += (1 - target) - density.mean()
    sparsity = 1 - density
    if sparsity.min() < 0 or sparsity.max() > 1:
        raise LayerIFError(f"lam={lam} pushes OWL sparsities outside [0, 1] at target {target}")
    return np.repeat(sparsity, per_block)


def layer_sparsities(scheme: str, *, param_counts, target: float, epsilon: float,
                     layer_scores=None, alpha=None, outlier_ratios=None, lam: float = 0.08,
                     smooth: bool = True, clip: float = 0.99, per_block: int = 7) -> np.ndarray:
    """Sparsity per prunable matrix for one allocation scheme.

    - "layerif": `sparsity_ratios(layer_scores, ...)`; high S, more sparsity.
    - "reversed": the LayerIF map inverted (high S gets LOW sparsity).
    - "uniform": `target` everywhere.
    - "alphapruning": the same linear map on the block mean of PL_Alpha_Hill
      (`alpha`, per block or per matrix). As in AlphaPruning's `ww_sparsity`,
      HIGHER alpha (a lighter-tailed spectrum: a less well-trained layer) gets
      MORE sparsity, and there is no smoothing (`smooth` is ignored).
    - "owl": `owl_sparsities(outlier_ratios, target, lam)`; `epsilon` unused.

    Every result is clipped at `clip`.
    """
    check_sparsity_args(target, epsilon, clip)
    d = _param_counts(param_counts, per_block)

    def need(value, name):
        if value is None:
            raise LayerIFError(f"scheme {scheme!r} needs {name}")
        return value

    if scheme in ("layerif", "reversed"):
        s = np.abs(_per_block(need(layer_scores, "layer_scores"), d, per_block, "layer_scores"))
        return _linear_map(s, d, target, epsilon, per_block, smooth=smooth,
                           invert=scheme == "reversed", clip=clip)
    if scheme == "uniform":
        return np.full(d.size, min(float(target), clip))
    if scheme == "alphapruning":
        a = _per_block(need(alpha, "alpha"), d, per_block, "alpha")
        return _linear_map(a, d, target, epsilon, per_block, smooth=False, invert=False, clip=clip)
    if scheme == "owl":
        D = as_vector(need(outlier_ratios, "outlier_ratios"), "outlier_ratios")
        if D.size != d.size // per_block:
            raise LayerIFError(
                f"outlier_ratios has {D.size} entries, expected {d.size // per_block} (one per block)"
            )
        return np.minimum(owl_sparsities(D, target, lam, per_block), clip)
    raise LayerIFError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
