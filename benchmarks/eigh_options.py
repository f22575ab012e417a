"""What one float64 eigendecomposition of a K-FAC factor costs on this machine, by solver.

K-FAC / EK-FAC on SmolLM2 decompose 90 matrices of 1536 x 1536 per run (README,
"Estimators compared"); this times the ways to do one (or two side by side), best of
--reps, on a covariance of the same size with a decaying spectrum:

    python benchmarks/eigh_options.py                 # d = 1536
    python benchmarks/eigh_options.py --d 576 --reps 5
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor


def best(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    import numpy as np
    import scipy.linalg as sl
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * a.d, a.d)) * np.geomspace(1, 1e-3, a.d)
    c = x.T @ x / len(x)
    c2 = c + np.eye(a.d) * 1e-6
    rows = {
        "numpy eigh float64": lambda: np.linalg.eigh(c),
        "numpy eigh float32": lambda: np.linalg.eigh(c.astype(np.float32)),
        "scipy eigh driver=evd": lambda: sl.eigh(c, driver="evd", check_finite=False),
        "scipy eigh driver=evr": lambda: sl.eigh(c, driver="evr", check_finite=False),
        "numpy eigh float64 x2, one after the other": lambda: (np.linalg.eigh(c),
                                                               np.linalg.eigh(c2)),
    }

    def two_threads():
        with threadpool_limits(1), ThreadPoolExecutor(2) as ex:
            list(ex.map(np.linalg.eigh, (c, c2)))
    rows["numpy eigh float64 x2, two threads of one BLAS thread each"] = two_threads
    got = {k: best(f, a.reps) for k, f in rows.items()}
    for k, v in got.items():
        print(f"{k:60s} {v:7.3f} s")
    print(json.dumps({"d": a.d, "reps": a.reps,
                      "seconds": {k: round(v, 4) for k, v in got.items()}}))
    return got


if __name__ == "__main__":
    main()
