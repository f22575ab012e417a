"""Linear datamodeling score (LDS) of every estimator and curvature on scikit-learn's
digits (bundled, no download): L2-regularised multinomial logistic regression.

The model is trained to convergence (SciPy L-BFGS in float64) on n training images;
then K random halves of the training set are retrained from the same start and their
losses on each validation image measured. An estimator predicts the loss of a subset
from the attribution scores tau(val, i) summed over the subset; LDS is the Spearman
correlation between predicted and actual losses across the K subsets, per validation
image, averaged. Influence uses the objective's own regulariser as the damping
(lambda = alpha), per validation example (`per_val=True`); "block" treats all
parameters as one unit, "tensor" inverts W and b separately (layer-wise: W and b are
two "layers", summed).

    python benchmarks/lds_digits.py                      # n=1000, m=100, K=50
    python benchmarks/lds_digits.py --quick              # a smoke run (seconds)

Writes a JSON report (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.stats import spearmanr

# (estimator, curvature, unit, options)
CONFIGS = [
    ("exact", "gauss_newton", "block", {}),
    ("cg", "gauss_newton", "block", {}),
    ("arnoldi", "gauss_newton", "block", {"k": 60}),
    ("lissa", "gauss_newton", "block", {"max_iter": 5000}),
    ("exact", "gauss_newton", "tensor", {}),
    ("exact", "empirical_fisher", "block", {}),
    ("datainf", "empirical_fisher", "tensor", {}),
    ("datainf", "empirical_fisher", "block", {}),
    ("identity", "empirical_fisher", "block", {}),
    ("cosine", "empirical_fisher", "block", {}),
]


def data(n: int, m: int, seed: int):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    order = np.random.default_rng(seed).permutation(len(X))
    tr, va = order[:n], order[n:n + m]
    return X[tr], y[tr], X[va], y[va]


def unpack(theta, d, c):
    return theta[:d * c].reshape(d, c), theta[d * c:]


def losses(theta, X, y, d, c):
    W, b = unpack(theta, d, c)
    z = X @ W + b
    z = z - z.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def fit(X, y, alpha, d, c, theta0):
    """argmin mean CE + alpha/2 |theta|^2, float64 L-BFGS to a gradient norm of 1e-10."""
    Y = np.eye(c)[y]

    def f(theta):
        W, b = unpack(theta, d, c)
        z = X @ W + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
        G = (p - Y) / len(y)
        grad = np.concatenate([(X.T @ G).ravel(), G.sum(0)]) + alpha * theta
        return loss + alpha / 2 * theta @ theta, grad

    res = minimize(f, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 10000, "gtol": 1e-10, "ftol": 1e-16})
    return res.x


def scores(theta, Xtr, ytr, Xva, yva, alpha, estimator, curvature, unit, options):
    import jax.numpy as jnp

    import layerif_jax as lj

    d, c = Xtr.shape[1], int(ytr.max()) + 1
    W, b = unpack(theta, d, c)
    params = {"layers": [{"w": jnp.asarray(W, jnp.float32)}, {"b": jnp.asarray(b, jnp.float32)}]}

    def output(p, ex):
        return ex["x"] @ p["layers"][0]["w"] + p["layers"][1]["b"]

    def ce(z, ex):
        return jnp.log(jnp.sum(jnp.exp(z - z.max()))) + z.max() - z[ex["y"]]

    ds = lambda X, y: {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.int32)}  # noqa: E731
    # block: one layer holding both tensors; tensor: each its own layer and unit
    layer_of = (lambda p: 0) if unit == "block" else r"layers\.(\d+)\."
    t0 = time.perf_counter()
    res = lj.influence_scores(lj.OutputLoss(output, ce), params, ds(Xtr, ytr), ds(Xva, yva),
                              layer_of=layer_of, unit="block", estimator=estimator,
                              curvature=curvature, damping=alpha, per_val=True, mesh=None,
                              chunk_size=100, estimator_options=options, aggregate="all")
    seconds = time.perf_counter() - t0
    return res.per_val_layers.sum(-1), seconds, res.meta.get("estimator_report", {})  # [n, m]


def lds(tau_nm, subsets, actual_km) -> float:
    """Mean over validation examples of Spearman(predicted, actual) across subsets; a
    positive score lowers the validation loss, so the prediction is -sum."""
    pred = -np.stack([tau_nm[s].sum(0) for s in subsets])             # [K, m]
    rs = [spearmanr(pred[:, j], actual_km[:, j])[0] for j in range(actual_km.shape[1])]
    return float(np.nanmean(rs))


def digits_args(doc: str, *, m: int, alpha: float, quick: str, out: str):
    """The options the digits benchmarks share."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="training images")
    p.add_argument("--m", type=int, default=m, help="validation images")
    p.add_argument("--alpha", type=float, default=alpha, help="L2 coefficient = damping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--configs", default="all",
                   help="comma-separated estimator:curvature:unit rows of CONFIGS, or all")
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def selected(configs, spec: str):
    """The CONFIGS rows named by --configs."""
    want = None if spec == "all" else set(spec.split(","))
    return [c for c in configs if want is None or f"{c[0]}:{c[1]}:{c[2]}" in want]


def main(argv=None):
    p = digits_args(__doc__, m=100, alpha=1e-2, quick="n=200, m=20, 10 subsets",
                    out="lds_digits.json")
    p.add_argument("--subsets", type=int, default=50)
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.m, a.subsets = 200, 20, 10
    Xtr, ytr, Xva, yva = data(a.n, a.m, a.seed)
    d, c = Xtr.shape[1], 10
    theta = fit(Xtr, ytr, a.alpha, d, c, np.zeros(d * c + c))
    rng = np.random.default_rng(a.seed + 1)
    subsets = [np.sort(rng.choice(a.n, a.n // 2, replace=False)) for _ in range(a.subsets)]
    t0 = time.perf_counter()
    actual = np.stack([losses(fit(Xtr[s], ytr[s], a.alpha, d, c, theta), Xva, yva, d, c)
                       for s in subsets])
    retrain_s = time.perf_counter() - t0
    rows = []
    for est, curv, unit, opts in selected(CONFIGS, a.configs):
        tau, secs, rep = scores(theta, Xtr, ytr, Xva, yva, a.alpha, est, curv, unit, opts)
        rows.append({"estimator": est, "curvature": curv, "unit": unit, "options": opts,
                     "lds": lds(tau, subsets, actual), "seconds": round(secs, 2),
                     "report": {k: v for k, v in rep.items() if k != "top_eigenvalue"}})
        print(f"{est:9s} {curv:17s} {unit:7s} LDS {rows[-1]['lds']:.3f}  {secs:6.2f} s",
              flush=True)
    out = {"n_train": a.n, "n_val": a.m, "subsets": a.subsets, "alpha": a.alpha,
           "seed": a.seed, "retrain_seconds": round(retrain_s, 1), "rows": rows}
    a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
