"""Mislabel detection with every estimator on scikit-learn's digits: flip the labels of a
fraction of the training images, train the L2-regularised logistic regression of
lds_digits.py, and rank the training images (a) by self-influence g_i . H^-1 g_i and
(b) by their influence on the clean validation images (most harmful first). Reports
the AUC of each ranking for finding the flipped images and the fraction found when
10% / 20% / 30% of the training set is inspected.

Self-influence comes from the same call as the validation influence: the validation
set is the training set itself (`per_val=True`), whose diagonal is g_i . H^-1 g_i
(for cosine it is 1 by construction: its self-influence ranking is noise).

    python benchmarks/mislabel_digits.py                   # n=1000, 10% flipped
    python benchmarks/mislabel_digits.py --quick
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

HERE = Path(__file__).resolve().parent
CONFIGS = [
    ("exact", "gauss_newton", "block", {}),
    ("cg", "gauss_newton", "block", {}),
    ("arnoldi", "gauss_newton", "block", {"k": 60}),
    ("exact", "empirical_fisher", "block", {}),
    ("datainf", "empirical_fisher", "tensor", {}),
    ("identity", "empirical_fisher", "block", {}),
    ("cosine", "empirical_fisher", "block", {}),
]


def lds_module():
    spec = importlib.util.spec_from_file_location("lds_digits", HERE / "lds_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a flipped image outranks a clean one (Mann-Whitney)."""
    r = rankdata(score)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def found(score: np.ndarray, positive: np.ndarray, fractions=(0.1, 0.2, 0.3)) -> dict:
    order = np.argsort(-score, kind="stable")
    return {f"{f:g}": float(positive[order[:int(round(f * len(score)))]].sum() / positive.sum())
            for f in fractions}


def main(argv=None):
    B = lds_module()
    p = B.digits_args(__doc__, m=200, alpha=1e-3, quick="n=300, m=60",
                      out="mislabel_digits.json")
    p.add_argument("--flip", type=float, default=0.1, help="fraction of labels flipped")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.m = 300, 60
    Xtr, ytr, Xva, yva = B.data(a.n, a.m, a.seed)
    rng = np.random.default_rng(a.seed + 7)
    flipped = np.zeros(a.n, bool)
    flipped[rng.choice(a.n, int(round(a.flip * a.n)), replace=False)] = True
    noisy = ytr.copy()
    noisy[flipped] = (ytr[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    d, c = Xtr.shape[1], 10
    theta = B.fit(Xtr, noisy, a.alpha, d, c, np.zeros(d * c + c))
    rows = []
    for est, curv, unit, opts in B.selected(CONFIGS, a.configs):
        t0 = time.perf_counter()
        self_tau, _, _ = B.scores(theta, Xtr, noisy, Xtr, noisy, a.alpha, est, curv, unit, opts)
        val_tau, _, _ = B.scores(theta, Xtr, noisy, Xva, yva, a.alpha, est, curv, unit, opts)
        secs = time.perf_counter() - t0
        self_inf = np.diag(self_tau)                   # g_i . H^-1 g_i
        harm = -val_tau.mean(1)                        # raises the clean validation loss
        rows.append({"estimator": est, "curvature": curv, "unit": unit,
                     "self_influence_auc": auc(self_inf, flipped),
                     "validation_auc": auc(harm, flipped),
                     "self_influence_found": found(self_inf, flipped),
                     "validation_found": found(harm, flipped), "seconds": round(secs, 2)})
        r = rows[-1]
        print(f"{est:9s} {curv:17s} {unit:7s} AUC self {r['self_influence_auc']:.3f} "
              f"val {r['validation_auc']:.3f}  found@20% self "
              f"{r['self_influence_found']['0.2']:.2f} val {r['validation_found']['0.2']:.2f}"
              f"  {secs:6.1f} s", flush=True)
    out = {"n_train": a.n, "n_val": a.m, "flipped": int(flipped.sum()), "alpha": a.alpha,
           "seed": a.seed, "train_accuracy_on_given_labels": float(np.mean(
               np.argmax(Xtr @ theta[:d * c].reshape(d, c) + theta[d * c:], 1) == noisy)),
           "rows": rows}
    a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
