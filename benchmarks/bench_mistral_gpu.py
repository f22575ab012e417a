"""All-layer DataInf scores on a Mistral-7B-shaped model with random bfloat16 weights.

For one GPU (an H200: 141 GB). The paper's code needed 402.77 s for ONE layer at
300 x 50 examples and 163,721 s at 3000 x 500 (4 GPUs); the targets here are all 32
layers in under 10 s and 60 s. Every example is 128 random tokens; the LoRA (r=8 on
q,k,v,o,gate,up,down, 20,971,520 parameters) holds small random values.

    python benchmarks/bench_mistral_gpu.py                      # 300x50 and 3000x500
    python benchmarks/bench_mistral_gpu.py --tiny --sizes 12x4  # CPU smoke test

At 3000 x 500 the per-example gradients (3000 x 21M x 4 B = 252 GB) do not fit:
layer_scores keeps those of about 700 examples (the 60 GB budget) and recomputes
the rest, so the training set is differentiated about 2.5 times (1 validation pass);
at 300 x 50 they are all kept (25 GB, 1 + 1 passes).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import layerif_jax as lj

MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                  head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096)
TINY = dict(MISTRAL_7B, vocab_size=512, hidden_size=64, intermediate_size=224, num_layers=4,
            num_heads=4, num_kv_heads=2, head_dim=16)


def build(cfg_kw, seed=0):
    cfg = lj.ModelConfig(**cfg_kw)
    model = lj.Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
    lj.apply_lora(model, lj.LoraConfig(rank=8, alpha=16), rngs=nnx.Rngs(seed + 1))
    key = jax.random.key(seed + 2)
    for lin in model.layers.linears().values():
        key, k = jax.random.split(key)
        lin.lora_b[...] = 0.01 * jax.random.normal(k, lin.lora_b.shape, jnp.float32)
    return model


def examples(n, length, vocab, seed):
    rng = np.random.default_rng(seed)
    return [lj.Example(rng.integers(0, vocab, length).astype(np.int32), np.arange(length) >= 1)
            for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="300x50,3000x500")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--chunks-per-call", type=int, default=4)
    ap.add_argument("--memory-budget", default="60GB")
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU smoke test)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)
    cfg_kw = TINY if args.tiny else MISTRAL_7B
    print(f"devices: {jax.devices()}", flush=True)
    t = time.perf_counter()
    model = build(cfg_kw)
    jax.block_until_ready(nnx.state(model))
    print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind),
           "jax": jax.__version__, "config": cfg_kw, "runs": []}
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        train = examples(n, args.tokens, cfg_kw["vocab_size"], 1)
        val = examples(m, args.tokens, cfg_kw["vocab_size"], 2)
        kw = dict(dtype=jnp.bfloat16, chunk_size=args.chunk_size, row_len=args.tokens,
                  chunks_per_call=args.chunks_per_call,
                  memory_budget=args.memory_budget, mesh="auto")
        t = time.perf_counter()
        res = lj.layer_scores(model, train[:args.chunk_size], val[:args.chunk_size], **kw)
        warmup = time.perf_counter() - t
        t = time.perf_counter()
        res = lj.layer_scores(model, train, val, **kw)
        secs = time.perf_counter() - t
        run = {"n_train": n, "n_val": m, "seconds": secs, "warmup_seconds": warmup,
               "gradients_kept": res.gradients_kept, "meta": res.meta,
               "finite": bool(np.all(np.isfinite(res.per_example)))}
        out["runs"].append(run)
        print(f"{n} x {m}: {secs:.1f} s (compile/warm-up call {warmup:.1f} s, gradients of "
              f"{res.meta['kept_examples']}/{n} examples kept, {res.meta['recomputed_calls']}/"
              f"{res.meta['calls']} calls recomputed)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
