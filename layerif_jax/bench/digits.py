"""Benchmarks on scikit-learn's bundled digits (no download): L2-regularised multinomial
logistic regression, trained to convergence, attributed with `influence_scores`.

* `lds_digits`: K random halves of the training set are retrained from the full
  solution and their losses on each validation image measured; an estimator predicts
  a subset's loss from the attribution scores summed over it; LDS = Spearman between
  predicted and actual across the subsets, per validation image, averaged.
* `mislabel_digits`: a fraction of the training labels is flipped before training;
  the training images are ranked by self-influence g_i . H^-1 g_i and by their harm
  to the clean validation images; AUC of finding the flipped ones, and the fraction
  found against the fraction inspected.

Influence uses the objective's own regulariser as the damping (lambda = alpha), per
validation example; "block" treats all parameters as one unit, "tensor" inverts W and
b separately (W and b are then two "layers", summed).
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import LayerIFError
from .metrics import auc, found_curve, lds

# (estimator, curvature, unit, options)
LDS_CONFIGS = (
    ("exact", "gauss_newton", "block", {}),
    ("cg", "gauss_newton", "block", {}),
    ("arnoldi", "gauss_newton", "block", {"k": 60}),
    ("lissa", "gauss_newton", "block", {"max_iter": 5000}),
    ("exact", "gauss_newton", "tensor", {}),
    ("exact", "true_fisher", "block", {}),
    ("cg", "true_fisher", "block", {}),
    ("exact", "empirical_fisher", "block", {}),
    ("datainf", "empirical_fisher", "tensor", {}),
    ("datainf", "empirical_fisher", "block", {}),
    ("identity", "empirical_fisher", "block", {}),
    ("cosine", "empirical_fisher", "block", {}),
)
MISLABEL_CONFIGS = tuple(c for c in LDS_CONFIGS if c[0] != "lissa" and c[:3] not in (
    ("exact", "gauss_newton", "tensor"), ("datainf", "empirical_fisher", "block"),
    ("cg", "true_fisher", "block")))
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


def config_name(c) -> str:
    return f"{c[0]}:{c[1]}:{c[2]}"


def select(configs, spec: str | None):
    """The configurations named in `spec` (estimator:curvature:unit, comma-separated)."""
    if spec in (None, "all"):
        return list(configs)
    want = spec.split(",")
    names = [config_name(c) for c in configs]
    bad = [w for w in want if w not in names]
    if bad:
        raise LayerIFError(f"unknown configuration {bad[0]!r} (choose from {', '.join(names)})")
    return [c for c in configs if config_name(c) in want]


def data(n: int, m: int, seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LayerIFError("the digits benchmarks need scikit-learn (pip install "
                           "'layerif_jax[bench]')") from None
    X, y = load_digits(return_X_y=True)
    if n + m > len(X):
        raise LayerIFError(f"digits has {len(X)} images: n + m = {n + m} is too many")
    X = X / 16.0
    order = np.random.default_rng(seed).permutation(len(X))
    tr, va = order[:n], order[n:n + m]
    return X[tr], y[tr], X[va], y[va]


def _unpack(theta, d, c):
    return theta[:d * c].reshape(d, c), theta[d * c:]


def losses(theta, X, y, d, c):
    W, b = _unpack(theta, d, c)
    z = X @ W + b
    z = z - z.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def fit(X, y, alpha, d, c, theta0):
    """argmin mean CE + alpha/2 |theta|^2, float64 L-BFGS to a gradient norm of 1e-10."""
    from scipy.optimize import minimize
    Y = np.eye(c)[y]

    def f(theta):
        W, b = _unpack(theta, d, c)
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


def scores(theta, Xtr, ytr, Xva, yva, alpha, config):
    """(tau [n, m], seconds, estimator report) of one configuration."""
    import jax.numpy as jnp

    from ..influence.api import influence_scores
    from ..influence import OutputLoss, sample_label

    estimator, curvature, unit, options = config
    d, c = Xtr.shape[1], 10
    W, b = _unpack(theta, d, c)
    params = {"layers": [{"w": jnp.asarray(W, jnp.float32)}, {"b": jnp.asarray(b, jnp.float32)}]}

    def output(p, ex):
        return ex["x"] @ p["layers"][0]["w"] + p["layers"][1]["b"]

    def ce(z, ex):
        return jnp.log(jnp.sum(jnp.exp(z - z.max()))) + z.max() - z[ex["y"]]

    ds = lambda X, y: {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.int32)}  # noqa: E731
    # block: one layer holding both tensors; tensor: each its own layer and unit
    layer_of = (lambda p: 0) if unit == "block" else r"layers\.(\d+)\."
    t0 = time.perf_counter()
    loss = OutputLoss(output, ce, sample_label("y"))   # the sampler: curvature="true_fisher"
    res = influence_scores(loss, params, ds(Xtr, ytr), ds(Xva, yva), layer_of=layer_of,
                           unit="block", estimator=estimator, curvature=curvature,
                           damping=alpha, per_val=True, mesh=None, chunk_size=100,
                           estimator_options=options, aggregate="all")
    report = {k: v for k, v in res.meta.get("estimator_report", {}).items()
              if k != "top_eigenvalue"}
    return res.per_val_layers.sum(-1), time.perf_counter() - t0, report


def _row(config, seconds, report, **metrics) -> dict:
    return {"config": config_name(config), "estimator": config[0], "curvature": config[1],
            "unit": config[2], "options": config[3], **metrics, "seconds": round(seconds, 2),
            "report": report}


def lds_digits(n: int = 1000, m: int = 100, subsets: int = 50, alpha: float = 1e-2,
               seed: int = 0, configs: str | None = None, log=print) -> dict:
    """The LDS of every configuration (see the module docstring)."""
    chosen = select(LDS_CONFIGS, configs)
    Xtr, ytr, Xva, yva = data(n, m, seed)
    d, c = Xtr.shape[1], 10
    theta = fit(Xtr, ytr, alpha, d, c, np.zeros(d * c + c))
    rng = np.random.default_rng(seed + 1)
    halves = [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(subsets)]
    t0 = time.perf_counter()
    actual = np.stack([losses(fit(Xtr[s], ytr[s], alpha, d, c, theta), Xva, yva, d, c)
                       for s in halves])
    retrain = time.perf_counter() - t0
    rows = []
    for cfg in chosen:
        tau, secs, rep = scores(theta, Xtr, ytr, Xva, yva, alpha, cfg)
        rows.append(_row(cfg, secs, rep, lds=lds(tau, halves, actual)))
        log(f"lds-digits  {rows[-1]['config']:34s} LDS {rows[-1]['lds']:.3f}  {secs:6.2f} s")
    return {"retrain_seconds": round(retrain, 1), "rows": rows}


def mislabel_digits(n: int = 1000, m: int = 200, flip: float = 0.1, alpha: float = 1e-3,
                    seed: int = 0, configs: str | None = None, log=print) -> dict:
    """Mislabel detection AUC and found-against-inspected curves (module docstring).
    Self-influence comes from a call whose validation set is the training set itself:
    its diagonal is g_i . H^-1 g_i (for cosine 1 by construction, so not reported)."""
    chosen = select(MISLABEL_CONFIGS, configs)
    Xtr, ytr, Xva, yva = data(n, m, seed)
    rng = np.random.default_rng(seed + 7)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(flip * n)), replace=False)] = True
    noisy = ytr.copy()
    noisy[flipped] = (ytr[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    d, c = Xtr.shape[1], 10
    theta = fit(Xtr, noisy, alpha, d, c, np.zeros(d * c + c))
    rows = []
    for cfg in chosen:
        self_tau, s1, _ = scores(theta, Xtr, noisy, Xtr, noisy, alpha, cfg)
        val_tau, s2, rep = scores(theta, Xtr, noisy, Xva, yva, alpha, cfg)
        self_inf = np.diag(self_tau)                   # g_i . H^-1 g_i
        harm = -val_tau.mean(1)                        # raises the clean validation loss
        cos = cfg[0] == "cosine"
        rows.append(_row(cfg, s1 + s2, rep,
                         self_influence_auc=None if cos else auc(self_inf, flipped),
                         validation_auc=auc(harm, flipped),
                         self_influence_found=None if cos else found_curve(
                             self_inf, flipped, FRACTIONS),
                         validation_found=found_curve(harm, flipped, FRACTIONS)))
        r = rows[-1]
        log(f"mislabel    {r['config']:34s} AUC self "
            f"{'-' if cos else format(r['self_influence_auc'], '.3f')} val "
            f"{r['validation_auc']:.3f}  {s1 + s2:6.1f} s")
    acc = float(np.mean(np.argmax(Xtr @ theta[:d * c].reshape(d, c) + theta[d * c:], 1) == noisy))
    return {"flipped": int(flipped.sum()), "fractions": list(FRACTIONS),
            "train_accuracy_on_given_labels": acc, "rows": rows}


__all__ = ["LDS_CONFIGS", "MISLABEL_CONFIGS", "select", "data", "fit", "losses", "scores",
           "lds_digits", "mislabel_digits"]
