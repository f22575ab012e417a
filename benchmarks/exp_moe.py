"""LoRA-MoE experiment (issue 5): expert allocations on SmolLM2-135M-Instruct.

For each task: the LayerIF scores of a LoRA fine-tuned on that task (a
`layerif scores` output, e.g. from benchmarks/exp_task_scores.sh) give the
LayerIF +ve and top25 allocations; uniform, MoLA 2-4-6-8 and AlphaLoRA (PL_Alpha_Hill
of the base weights) are the baselines. All use T experts in total, the same
training records, steps, learning-rate schedule and seed. Each MoE-LoRA is trained
with `train_moe` (AdamW, warm-up + linear decay) on the first --n-train records and
evaluated on the first --n-eval validation records: log-likelihood accuracy (the
candidate label whose answer text is most likely) and, with --generate, greedy
generation with answer extraction. Rows go to OUT/rows.jsonl as they finish (a killed
run resumes); OUT/table.md and OUT/experts.png (experts per layer per method) are
rewritten after each row.

    python benchmarks/exp_moe.py --task mrpc=/work/exp/mrpc/scores/scores.json \
        --task cola=/work/exp/cola/scores/scores.json --out exp_moe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from layerif_jax.applications.allocation import (alphalora_experts, expert_counts, mola_experts,
                                  top_k_per_layer, uniform_experts)
from layerif_jax.applications.allocation import read_metric
from layerif_jax.data import load_records, tokenize
from layerif_jax.io import atomic_path, default_model_path, shared_data_dir
from layerif_jax.formats import load_model
from layerif_jax.models.tokenizer import load_tokenizer
from layerif_jax.applications.moe import MoELoraModel, train_moe
from layerif_jax.evaluation import accuracy
from layerif_jax.applications.prune import alpha_per_matrix
from layerif_jax.training import TrainConfig

METHODS = ("layerif+ve", "layerif-top25", "uniform", "mola-2468", "alphalora")


def allocations(scores_path: str, alpha: np.ndarray, L: int, total: int, beta: float) -> dict:
    return {
        "layerif+ve": expert_counts(read_metric(scores_path, "layer_scores", "+ve"), total, beta),
        "layerif-top25": expert_counts(read_metric(scores_path, "layer_scores", "top25"), total, beta),
        "uniform": uniform_experts(L, total),
        "mola-2468": mola_experts(L, total, "2-4-6-8"),
        "alphalora": alphalora_experts(alpha, total, beta),
    }


def plot(allocs: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(allocs)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        methods = list(allocs[task])
        w = 0.8 / len(methods)
        for i, m in enumerate(methods):
            e = np.asarray(allocs[task][m])
            ax.bar(np.arange(e.size) + (i - (len(methods) - 1) / 2) * w, e, w, label=m)
        ax.set_title(f"{task}: experts per layer (T = {int(np.sum(e))})")
        ax.set_xlabel("layer")
        ax.set_ylabel("experts")
        ax.legend(ncol=len(methods), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| task | allocation | experts (min-max) | loglik acc | generate acc | train s "
             "| train loss (epoch mean) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "" if r.get("gen_acc") is None else f"{100 * r['gen_acc']:.1f}"
        lines.append(f"| {r['task']} | {r['method']} | {min(r['experts'])}-{max(r['experts'])} "
                     f"| {100 * r['loglik_acc']:.1f} | {g} | {r['train_seconds']:.0f} "
                     f"| {r['final_loss']:.4f} |")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", action="append", required=True,
                   help="NAME=SCORES_JSON (NAME: mrpc, cola, rte); repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--total", type=int, default=150)
    p.add_argument("--beta", type=float, default=2.5)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--generate", action="store_true", help="also greedy-generation accuracy")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = shared_data_dir() / "layerif-tasks"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["task"], r["method"]) for r in rows}

    model_path = a.model or default_model_path()
    tok = load_tokenizer(model_path)
    base = load_model(model_path)
    L = base.cfg.num_layers
    alpha = alpha_per_matrix(base)
    tasks = dict(t.split("=", 1) for t in a.task)
    allocs = {t: {m: v.tolist() for m, v in allocations(s, alpha, L, a.total, a.beta).items()}
              for t, s in tasks.items()}
    with atomic_path(out / "allocations.json") as tmp:
        Path(tmp).write_text(json.dumps({"total": a.total, "beta": a.beta, "allocations": allocs},
                                        indent=1))
    plot(allocs, out / "experts.png")
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, warmup_steps=5, batch_size=a.batch_size,
                      max_len=a.max_len, seed=a.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for task, _ in tasks.items():
        train_file = data / f"glue_{task}_train.json"
        val_file = data / f"glue_{task}_validation.json"
        train = tokenize(tok, load_records(train_file, a.n_train), max_len=a.max_len,
                         mask_prompt=True, source=str(train_file))
        for method in a.methods.split(","):
            if (task, method) in done:
                continue
            experts = allocs[task][method]
            base = load_model(model_path)  # MoELoraModel holds (and freezes) its base
            moe = MoELoraModel(base, experts, top_k=top_k_per_layer(experts).tolist(),
                               rngs=nnx.Rngs(a.seed))
            run_dir = out / f"{task}_{method}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-trained run restarts clean
            t0 = time.perf_counter()
            hist = train_moe(moe, train, run_dir, cfg, pad_id=pad, base_model_name=str(model_path))
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            ll = accuracy(moe, tok, val_file, a.n_eval, "loglik", batch_size=16)
            gen = accuracy(moe, tok, val_file, a.n_eval, "generate", batch_size=16,
                           max_new_tokens=8) if a.generate else None
            t_eval = time.perf_counter() - t0
            last = hist["epochs"][-1] if hist.get("epochs") else {}
            row = {"task": task, "method": method, "experts": experts, "total": a.total,
                   "n_train": len(train), "n_eval": ll["n"], "steps": hist.get("step"),
                   "loglik_acc": ll["accuracy"],
                   "gen_acc": None if gen is None else gen["accuracy"],
                   "gen_unparsed": None if gen is None else gen["unparsed"],
                   "train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1),
                   "final_loss": float(last.get("train_loss", float("nan"))),
                   "seed": a.seed, "jax": jax.__version__, "cpu_count": os.cpu_count(),
                   "platform": platform.platform()}
            rows.append(row)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_table(rows, out / "table.md")
            print(f"{task} {method:14s} loglik {100 * row['loglik_acc']:5.1f} "
                  f"train {t_train:6.1f} s eval {t_eval:6.1f} s loss {row['final_loss']:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
