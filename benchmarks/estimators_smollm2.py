"""Every estimator on the same per-example gradients of SmolLM2-135M-Instruct: time and
the layer-score agreement with exact, DataInf and EK-FAC (does LayerIF's layer ranking
depend on the estimator?). The benchmark itself is `layerif_jax.bench.estimators_lm`
(also `layerif bench --suites estimators-lm`).

The setting of PEERS.md: LoRA r=8, alpha=16 on q,k,v,o,gate,up,down of all 30 blocks
(an adapter from --adapter, or small random values), the first n MRPC training and m
validation records, DataInf's adaptive per-tensor damping (0.1 mean ||g||^2 / d) unless
--damping-scale. One `layer_scores(..., estimator=[...])` call: the gradients are taken
once, every estimator's preconditioning and scoring is timed on its own
(meta["phase_seconds"]). An iterative estimator that does not converge within its
max_iter is reported as such (with its residual), not as a result.

    python benchmarks/estimators_smollm2.py --n 40 --m 10
    python benchmarks/estimators_smollm2.py --out estimators.json        # 300 x 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerif_jax.bench import ESTIMATORS, estimators_lm, smollm2_mrpc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="PEFT adapter dir (default: random, seed 0)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--damping-scale", type=float, default=0.1)
    ap.add_argument("--memory-budget", default="8GB")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    model, _, train, val = smollm2_mrpc(a.n, a.m, adapter=a.adapter)
    out = {**estimators_lm(model, train, val, a.estimators.split(","),
                           damping_scale=a.damping_scale, memory_budget=a.memory_budget),
           "damping_scale": a.damping_scale}
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
