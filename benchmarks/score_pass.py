#!/usr/bin/env python
"""A/B of the score pass of a recomputed call on SmolLM2-135M (CPU or any device): the
engine's score call (h . g_e with no per-example gradient formed, `PackedEngine.scores`)
against recomputing the call's per-example gradients and dotting them with h (what the
driver did before). Same packed calls, same random h (one direction: the mean
validation gradient's shape), interleaved, --repeats rounds after one warm-up; prints
the median seconds per call of each, their ratio, and the largest difference of the
scores relative to their largest magnitude.

    python benchmarks/score_pass.py --n 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="training examples (MRPC)")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--chunks-per-call", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from layerif_jax.bench import smollm2_mrpc
    from layerif_jax.influence import core
    from layerif_jax.influence.engines.packed import PackedEngine

    model, _, train, _ = smollm2_mrpc(a.n, 1)
    eng = PackedEngine(model, dtype=None, mesh=None, chunk_size=a.chunk_size, row_len=None,
                       chunks_per_call=a.chunks_per_call)
    eng.plan([train])
    calls = eng.chunks(train)
    rng = np.random.default_rng(0)
    h = [jnp.asarray(rng.normal(size=(1, *x.shape)), jnp.float32)
         for x in jax.tree.leaves(eng.params)]
    dots = jax.jit(core.dots)
    ways = {"score call": lambda c: eng.scores(c, h)[0],
            "gradients + dots": lambda c: dots(eng.grads(c)[0], h)}
    got = {k: [jax.block_until_ready(f(c)) for c in calls] for k, f in ways.items()}  # warm-up
    a_, b_ = (np.concatenate([np.asarray(x) for x in v]) for v in got.values())
    times = {k: [] for k in ways}
    for _ in range(a.repeats):
        for k, f in ways.items():
            t0 = time.perf_counter()
            for c in calls:
                jax.block_until_ready(f(c))
            times[k].append((time.perf_counter() - t0) / len(calls))
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"n": a.n, "calls": len(calls), "chunk_size": a.chunk_size,
           "chunks_per_call": a.chunks_per_call, "repeats": a.repeats,
           "device": str(jax.devices()[0]), "jax": jax.__version__,
           "seconds_per_call_median": med,
           "ratio": med["score call"] / med["gradients + dots"],
           "max_rel_diff": float(np.abs(a_ - b_).max() / np.abs(b_).max())}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
