"""PL_Alpha_Hill: the heavy-tail exponent of a weight matrix's spectrum (AlphaPruning)."""

from __future__ import annotations

import numpy as np

from ...errors import LayerIFError

__all__ = ["pl_alpha_hill"]


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
