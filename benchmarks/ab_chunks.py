"""Per-chunk A/B: the packed per-example-gradient function vs one plain jitted fwd+bwd.

Both run on the same packed chunks (SmolLM2-135M-Instruct, random LoRA as in
bench_influence.py), alternating for --rounds rounds, so that this machine's drift
hits both sides alike. Prints the seconds per chunk of each round and the ratio of
the minima (the cost of extracting per-example gradients over a plain backward).

    python benchmarks/ab_chunks.py --n 50 --chunks 5 --rounds 4
"""

from __future__ import annotations

import argparse
import time

import jax

import layerif_jax as lj
from bench_influence import fwd_bwd_fn, random_lora
from layerif_jax.influence.engines.packed import PackedEngine
from layerif_jax.io import default_model_path, shared_data_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="MRPC training records to pack")
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args(argv)

    path = default_model_path()
    model = random_lora(lj.load_model(path), 0)
    tok = lj.load_tokenizer(path)
    recs = lj.load_records(shared_data_dir() / "layerif-tasks" / "glue_mrpc_train.json", args.n)
    train = lj.tokenize(tok, recs, max_len=args.max_len)
    r = PackedEngine(model, dtype=None, mesh=None, chunk_size=8, row_len=None,
                     chunks_per_call=1)
    r.plan([train])
    chunks = r.chunks(train)[:args.chunks]   # groups of one chunk
    fwd_bwd = fwd_bwd_fn(r.graphdef)

    sides = {"per-example grads": lambda: [r.grads(c) for c in chunks],
             "plain fwd+bwd": lambda: [fwd_bwd(r.params, r.rest, *c.arrays[:4]) for c in chunks]}
    for f in sides.values():  # compile
        jax.block_until_ready(f())
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, f in sides.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append((time.perf_counter() - t) / len(chunks))
    for k, v in times.items():
        print(f"{k:18s} s per chunk: " + " ".join(f"{x:.2f}" for x in v))
    a, b = (min(v) for v in times.values())
    print(f"chunk shape {chunks[0].chunk_shape}, {len(chunks)} chunks; ratio of minima {a / b:.3f}")


if __name__ == "__main__":
    main()
