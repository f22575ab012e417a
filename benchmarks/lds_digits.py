"""Linear datamodeling score (LDS) of every estimator and curvature on scikit-learn's
digits (bundled, no download): L2-regularised multinomial logistic regression trained to
convergence, K random halves retrained, Spearman between predicted and actual validation
losses per validation image, averaged. The benchmark itself is
`layerif_jax.bench.lds_digits` (also `layerif bench --suites lds-digits`).

    python benchmarks/lds_digits.py                      # n=1000, m=100, K=50
    python benchmarks/lds_digits.py --quick              # n=200, m=20, K=10

Writes a JSON report (--out) and prints a line per configuration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerif_jax.bench import lds_digits


def digits_args(doc: str, *, m: int, alpha: float, quick: str, out: str):
    """The options the digits benchmark scripts share."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="training images")
    p.add_argument("--m", type=int, default=m, help="validation images")
    p.add_argument("--alpha", type=float, default=alpha, help="L2 coefficient = damping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--configs", default="all",
                   help="comma-separated estimator:curvature:unit configurations, or all")
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def main(argv=None):
    p = digits_args(__doc__, m=100, alpha=1e-2, quick="n=200, m=20, 10 subsets",
                    out="lds_digits.json")
    p.add_argument("--subsets", type=int, default=50)
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.m, a.subsets = 200, 20, 10
    res = lds_digits(a.n, a.m, a.subsets, a.alpha, a.seed, a.configs)
    out = {"n_train": a.n, "n_val": a.m, "subsets": a.subsets, "alpha": a.alpha,
           "seed": a.seed, **res}
    a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
