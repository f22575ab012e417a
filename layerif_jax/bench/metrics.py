"""The metrics every benchmark scores estimators by (DataInf's and TRAK's protocols)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive outranks a negative (Mann-Whitney; ties count half)."""
    positive = np.asarray(positive, bool)
    r = rankdata(score)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def found_curve(score: np.ndarray, positive: np.ndarray, fractions) -> list[float]:
    """Fraction of the positives among the top `f` of the ranking, for each f."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(score), kind="stable")
    return [float(positive[order[:int(round(f * len(order)))]].sum() / max(positive.sum(), 1))
            for f in fractions]


def recall_at_k(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Fraction of the top k that are positives (DataInf's class-detection recall)."""
    order = np.argsort(-np.asarray(score), kind="stable")[:k]
    return float(np.asarray(positive, bool)[order].mean())


def lds(tau_nm: np.ndarray, subsets, actual_km: np.ndarray) -> float:
    """Linear datamodeling score: per validation example, the Spearman correlation across
    subsets between the predicted and the actual validation loss, averaged. A positive
    score lowers the validation loss, so the prediction is -sum over the subset."""
    pred = -np.stack([tau_nm[s].sum(0) for s in subsets])             # [K, m]
    rs = [spearmanr(pred[:, j], actual_km[:, j])[0] for j in range(actual_km.shape[1])]
    return float(np.nanmean(rs))


__all__ = ["auc", "found_curve", "recall_at_k", "lds"]
