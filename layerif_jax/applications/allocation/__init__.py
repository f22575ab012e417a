"""Turn layer scores into per-layer budgets (METHOD.md sections 4 and 5).

Pure numpy/scipy in float64; nothing here needs jax.

Experts per layer for LoRA-MoE (section 4):
    `expert_counts` (LayerIF), `uniform_experts`, `mola_experts`,
    `alphalora_experts`, and `top_k_per_layer`.
Sparsity per prunable matrix (section 5):
    `sparsity_ratios` (LayerIF), `owl_sparsities`, `pl_alpha_hill`, and the
    dispatcher `layer_sparsities` over "layerif", "reversed", "uniform",
    "alphapruning" and "owl".

Per-matrix vectors are in model order: block 0's q, k, v, o, gate, up, down,
then block 1's, and so on (`per_block` matrices per block, 7 by default).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy.signal import savgol_filter

from ...errors import LayerIFError

MOLA_PRESETS = {
    "2-4-6-8": (2, 4, 6, 8),
    "8-6-4-2": (8, 6, 4, 2),
    "5-5-5-5": (5, 5, 5, 5),
    "8-2-2-8": (8, 2, 2, 8),
}
SCHEMES = ("layerif", "reversed", "uniform", "alphapruning", "owl")

# Shares are rounded to this many decimals before floor / tie-breaking, so
# that float noise (2.9999999999 for 3) cannot break an exact tie.
_SHARE_DECIMALS = 9


# ----------------------------------------------------------------- helpers


def _vector(x, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise LayerIFError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise LayerIFError(f"{name} is not finite at index {bad[0]} ({v[bad[0]]})")
    return v


def check_total(num_layers: int, total: int) -> None:
    if num_layers < 1:
        raise LayerIFError(f"need at least one layer, got {num_layers}")
    if int(total) != total or total < num_layers:
        raise LayerIFError(
            f"total experts T={total} must be an integer >= the number of layers L={num_layers}"
        )


def _block_means(v: np.ndarray, per_block: int, name: str) -> np.ndarray:
    if per_block < 1 or v.size % per_block:
        raise LayerIFError(f"{name} has {v.size} entries, not a multiple of per_block={per_block}")
    return v.reshape(-1, per_block).mean(axis=1)


def _largest_remainder(shares: np.ndarray, base: np.ndarray, total: int) -> np.ndarray:
    """Hand out `total - sum(base)` extra units, one each, to the largest
    fractional parts of `shares` (ties: lower index first)."""
    frac = np.round(shares - np.floor(shares), _SHARE_DECIMALS)
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
    shares = np.round(weights * total / weights.sum(), _SHARE_DECIMALS)
    base = np.maximum(np.floor(shares), 1).astype(np.int64)
    while base.sum() > total:
        over = np.where(base > 1, base - shares, -np.inf)
        base[len(over) - 1 - np.argmax(over[::-1])] -= 1
    return _largest_remainder(shares, base, total)


def _minmax(a: np.ndarray) -> np.ndarray | None:
    """(a - min)/(max - min), or None where a is constant (up to 1e-12 relative)."""
    lo, hi = a.min(), a.max()
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), np.finfo(float).tiny):
        return None
    return (a - lo) / (hi - lo)


def _savgol(a: np.ndarray, window: int = 7, polyorder: int = 3) -> np.ndarray:
    """Savitzky-Golay, mode "interp". Fewer than `window` layers: the largest odd
    window <= L that is > polyorder; none exists (L < 5): no smoothing."""
    w = min(window, a.size if a.size % 2 else a.size - 1)
    if w <= polyorder:
        return a
    return savgol_filter(a, w, polyorder, mode="interp")


# ------------------------------------------------------- section 4: experts


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
    s = _vector(layer_scores, "layer_scores")
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
    shares = np.round(w * (total - s.size) / w.sum(), _SHARE_DECIMALS)
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
    a = _vector(alpha, "alpha")
    if per_block < 1 or a.size % per_block:
        raise LayerIFError(
            f"AlphaLoRA needs PL_Alpha_Hill values, {per_block} per block (one per matrix; "
            f"per_block=1 for one per block), got {a.size} values: compute them with "
            "`layerif alpha --model M --out alpha.json` (or layerif_jax.applications.prune.alpha_per_matrix)")
    return expert_counts(_block_means(a, per_block, "alpha"), total, beta)


# ------------------------------------------------------- section 5: sparsity


def check_sparsity_args(target: float, epsilon: float, clip: float) -> None:
    if not 0 < target < 1:
        raise LayerIFError(f"target sparsity must be in (0, 1), got {target}")
    if not 0 <= epsilon < 1:
        raise LayerIFError(f"epsilon must be in [0, 1), got {epsilon}")
    if not 0 < clip <= 1:
        raise LayerIFError(f"clip must be in (0, 1], got {clip}")


def _param_counts(param_counts, per_block: int) -> np.ndarray:
    d = _vector(param_counts, "param_counts")
    if (d <= 0).any():
        raise LayerIFError("param_counts must all be > 0")
    if per_block < 1 or d.size % per_block:
        raise LayerIFError(f"param_counts has {d.size} entries, not a multiple of per_block={per_block}")
    return d


def _per_block(scores, d: np.ndarray, per_block: int, name: str) -> np.ndarray:
    """One value per block: `scores` per block as given, or per matrix averaged per block."""
    s = _vector(scores, name)
    num_layers = d.size // per_block
    if s.size == d.size:
        return _block_means(s, per_block, name)
    if s.size != num_layers:
        raise LayerIFError(
            f"{name} has {s.size} entries but param_counts implies {num_layers} blocks "
            f"({d.size} matrices): give {num_layers} or {d.size} values"
        )
    return s


def _linear_map(metric: np.ndarray, d: np.ndarray, target: float, epsilon: float,
                per_block: int, *, smooth: bool, invert: bool, clip: float) -> np.ndarray:
    """Steps 1-6 of METHOD.md section 5 on one metric value per block."""
    a = _minmax(metric)
    if a is not None and smooth:
        a = _minmax(_savgol(a))
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
    D = _vector(outlier_ratios, "outlier_ratios")
    x = _minmax(D)
    if x is None:
        warnings.warn("outlier ratios are constant: returning uniform sparsity", stacklevel=2)
        return np.full(D.size * per_block, float(target))
    density = x * 2 * lam
    density += (1 - target) - density.mean()
    sparsity = 1 - density
    if sparsity.min() < 0 or sparsity.max() > 1:
        raise LayerIFError(f"lam={lam} pushes OWL sparsities outside [0, 1] at target {target}")
    return np.repeat(sparsity, per_block)


def pl_alpha_hill(weight, xmin: str = "peak", bins: int = 100) -> float:
    """PL_Alpha_Hill of one weight matrix (AlphaPruning's `net_esd_estimator`).

    Eigenvalues: squared singular values in float64, ascending; values below
    1e-12 of the largest (numerical zeros of a rank-deficient matrix) are dropped.
    For a cut-off xmin = lambda_i the Hill / continuous-power-law MLE is

        alpha = 1 + n / sum_{j >= i} ln(lambda_j / xmin),   n = N - i,

    i.e. n counts xmin itself (as in AlphaPruning and WeightWatcher); the KS
    distance is max_j |1 - (lambda_j / xmin)^(1 - alpha) - j/n| over the tail
    (1 where alpha <= 1). The cut-off is the candidate with the smallest KS
    distance (ties: the smaller xmin). Candidates:

    - "peak" (AlphaPruning's `fix_fingers='xmin_peak'`, used for alpha_peak.npy):
      p = 10**(left edge of the fullest of `bins` equal bins of log10 lambda);
      every lambda_i except the largest with log10(0.95 p) <= lambda_i <= 1.5 p.
      The lower bound compares an eigenvalue with a log10 - a quirk of the
      reference kept on purpose so values match its published numbers.
    - "mid" (`fix_fingers='xmin_mid'`): the single cut-off i = N // 2.
    - "all": every lambda_i except the largest.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or not np.isfinite(w).all():
        raise LayerIFError(f"weight must be a finite 2-D matrix, got shape {w.shape}")
    if xmin not in ("peak", "mid", "all"):
        raise LayerIFError(f"xmin must be 'peak', 'mid' or 'all', got {xmin!r}")
    eigs = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    eigs = eigs[eigs > eigs[-1] * 1e-12]
    n_eigs = eigs.size
    if n_eigs < 2:
        raise LayerIFError(f"weight of shape {w.shape} has fewer than 2 non-zero singular values")
    log_eigs = np.log(eigs)
    tail_log_sum = np.cumsum(log_eigs[::-1])[::-1]  # sum_{j >= i} ln lambda_j

    if xmin == "mid":
        candidates = np.array([n_eigs // 2])
    else:
        candidates = np.arange(n_eigs - 1)
        if xmin == "peak":
            h = np.log10(eigs)
            counts, edges = np.histogram(h, bins=bins, range=(h.min(), h.max()))
            peak = 10 ** edges[np.argmax(counts)]
            lo, hi = np.log10(0.95 * peak), 1.5 * peak
            candidates = candidates[(eigs[:-1] >= lo) & (eigs[:-1] <= hi)]

    best_alpha, best_d = None, np.inf
    for i in candidates:
        n = n_eigs - i
        denom = tail_log_sum[i] - n * log_eigs[i]
        if denom <= 0:  # all tail eigenvalues equal xmin: no tail to fit
            continue
        alpha = 1 + n / denom
        ks = 1.0
        if alpha > 1:
            fitted = 1 - (eigs[i:] / eigs[i]) ** (1 - alpha)
            ks = np.abs(fitted - np.arange(n) / n).max()
        if ks < best_d:
            best_alpha, best_d = alpha, ks
    if best_alpha is None:
        raise LayerIFError(f"no power-law cut-off for weight of shape {w.shape}: eigenvalues all equal")
    return float(best_alpha)


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
        D = _vector(need(outlier_ratios, "outlier_ratios"), "outlier_ratios")
        if D.size != d.size // per_block:
            raise LayerIFError(
                f"outlier_ratios has {D.size} entries, expected {d.size // per_block} (one per block)"
            )
        return np.minimum(owl_sparsities(D, target, lam, per_block), clip)
    raise LayerIFError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


# ------------------------------------------------------------ reading metrics

METRICS = ("layer_scores", "alpha", "outlier_ratios")
_ALPHA_HINT = ("compute them with `layerif alpha --model M --out alpha.json` (or "
               "layerif_jax.applications.prune.alpha_per_matrix)")


def read_metric(path, kind: str = "layer_scores", aggregate: str = "+ve") -> np.ndarray:
    """A per-layer or per-matrix metric from a file, as float64.

    Accepted: a `.npy`, a JSON list (or {name: value} object) of numbers, or a JSON
    object written by this package: `layerif scores` (scores.json: the `aggregate`
    from layer_scores_by_aggregate), `layerif run` (run.json, report/allocation.json:
    LayerIF scores and alpha_per_matrix), `layerif alpha` (alpha) or OWL outlier
    ratios (outlier_ratios). A file holding the wrong kind (LayerIF scores where
    PL_Alpha_Hill is needed, say) is refused with what it holds and how to get the
    right one.
    """
    if kind not in METRICS:
        raise LayerIFError(f"unknown metric {kind!r} (choose from {', '.join(METRICS)})")
    from ...io import read_json

    p = Path(path)
    if p.suffix == ".npy":
        try:
            values = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LayerIFError(f"cannot read {p}: {e}") from None
        if values.dtype.kind not in "iuf":
            raise LayerIFError(f"{p}: expected numbers, got an array of {values.dtype}")
        return np.asarray(values, np.float64).reshape(-1)
    obj = read_json(p)
    values = obj
    if isinstance(obj, dict):
        values = _metric_of(obj, kind, aggregate, p)
    if isinstance(values, dict):
        values = list(values.values())
    if not isinstance(values, list) or not values:
        raise LayerIFError(f"{p}: expected a non-empty list of numbers for {kind}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LayerIFError(f"{p}: {kind} must be numbers; entry {i} is {v!r}")
    return np.asarray(values, np.float64)


def _metric_of(obj: dict, kind: str, aggregate: str, p: Path):
    has_scores = "layer_scores" in obj or "layer_scores_by_aggregate" in obj
    has_alpha = "alpha" in obj or "alpha_per_matrix" in obj
    if kind == "layer_scores":
        by = obj.get("layer_scores_by_aggregate") or {}
        if aggregate in by:
            return by[aggregate]
        if "layer_scores" in obj:
            if by:
                raise LayerIFError(f"{p} has no {aggregate!r} aggregate (it has "
                                   f"{', '.join(by)})")
            return obj["layer_scores"]
        if has_alpha:
            raise LayerIFError(f"{p} holds PL_Alpha_Hill values, not LayerIF layer scores "
                               "(`layerif scores` writes those)")
    elif kind == "alpha":
        for key in ("alpha", "alpha_per_matrix"):
            if key in obj:
                return obj[key]
        if has_scores:
            raise LayerIFError(f"{p} holds LayerIF layer scores, but PL_Alpha_Hill values "
                               f"(one per matrix) are needed here: {_ALPHA_HINT}")
    elif "outlier_ratios" in obj:
        return obj["outlier_ratios"]
    raise LayerIFError(f"{p}: no {kind} in it (keys: {', '.join(list(obj)[:8])})")
