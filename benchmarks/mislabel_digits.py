"""Mislabel detection with every estimator on scikit-learn's digits: flip the labels of a
fraction of the training images, train the L2-regularised logistic regression, rank the
training images by self-influence g_i . H^-1 g_i and by their harm to clean validation
images; AUC of finding the flipped ones and the fraction found against the fraction
inspected. The benchmark itself is `layerif_jax.bench.mislabel_digits` (also
`layerif bench --suites mislabel-digits`).

    python benchmarks/mislabel_digits.py                   # n=1000, 10% flipped
    python benchmarks/mislabel_digits.py --quick           # n=300, m=60
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from layerif_jax.bench import mislabel_digits

HERE = Path(__file__).resolve().parent


def main(argv=None):
    spec = importlib.util.spec_from_file_location("lds_digits", HERE / "lds_digits.py")
    lds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lds)
    p = lds.digits_args(__doc__, m=200, alpha=1e-3, quick="n=300, m=60",
                        out="mislabel_digits.json")
    p.add_argument("--flip", type=float, default=0.1, help="fraction of labels flipped")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.m = 300, 60
    res = mislabel_digits(a.n, a.m, a.flip, a.alpha, a.seed, a.configs)
    out = {"n_train": a.n, "n_val": a.m, "alpha": a.alpha, "seed": a.seed, **res}
    a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
