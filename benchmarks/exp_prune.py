"""Pruning experiment (issue 4): allocation schemes x pruners x sparsities on SmolLM2.

One process loads SmolLM2-135M-Instruct once, computes every allocation metric once
(LayerIF scores from a `layerif scores` run, PL_Alpha_Hill, OWL outlier ratios), then for
each (sparsity, pruner, allocation) restores the dense weights, prunes (calibration
block by block through the already-pruned blocks, inside `prune_model`), and evaluates:
WikiText-2 test perplexity over the first --ppl-tokens tokens and zero-shot
multiple-choice accuracy (log-likelihood of each candidate) on --mc-limit records of
each task in --mc-tasks. Each finished row is appended to OUT/rows.jsonl at once, so
a killed run resumes where it stopped; OUT/table.md is rewritten after every row.

    python benchmarks/exp_prune.py --scores /work/exp/mrpc/scores/scores.json --out exp_prune
    python benchmarks/exp_prune.py --scores S --out D --sparsities 0.5 --methods magnitude --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from layerif_jax.applications.allocation import layer_sparsities
from layerif_jax.applications.allocation import read_metric
from layerif_jax.applications.prune import DEFAULT_EPSILON, METHODS, PRUNERS
from layerif_jax.evaluation import mc_accuracy, perplexity
from layerif_jax.io import atomic_path, default_model_path, shared_data_dir
from layerif_jax.formats import load_model
from layerif_jax.models.tokenizer import load_tokenizer
from layerif_jax.applications.prune import (alpha_per_matrix, calibration_ids, global_sparsity,
                               outlier_ratios, prune_model)

SCHEMES = ("uniform", "alphapruning", "owl", "layerif", "reversed")
MC_TASKS = ("qa_openbook_test_all", "qa_commonq_test_all", "glue_rte_validation")


def kernels(model):
    return {n: lin.kernel[...] for n, lin in model.layers.linears().items()}


def restore(model, saved):
    for n, lin in model.layers.linears().items():
        lin.kernel.set_value(saved[n])


def evaluate(model, tok, a, data) -> dict:
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, data / "wikitext-2-raw" / "wiki.test.raw", window=a.ppl_window,
                     max_tokens=a.ppl_tokens, batch_size=4, progress=False)
    acc, acc_norm = {}, {}
    for t in a.mc_tasks:
        r = mc_accuracy(model, tok, data / "layerif-tasks" / f"{t}.json", limit=a.mc_limit,
                        batch_size=16, progress=False)
        acc[t], acc_norm[t] = r["accuracy"], r["accuracy_norm"]
    return {"ppl": ppl["perplexity"], "ppl_tokens": ppl["n_tokens"], "acc": acc,
            "acc_norm": acc_norm, "mean_acc": float(np.mean(list(acc.values()))),
            "mean_acc_norm": float(np.mean(list(acc_norm.values()))),
            "eval_seconds": round(time.perf_counter() - t0, 2)}


def write_table(rows: list[dict], path: Path, a) -> None:
    lines = [f"| sparsity | pruner | allocation | WikiText-2 ppl | mean acc ({len(a.mc_tasks)} tasks) "
             "| mean acc_norm | global sparsity | prune s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']:g} | {r['method']} | {r['allocation']} | {r['ppl']:.2f} "
                     f"| {100 * r['mean_acc']:.1f} | {100 * r['mean_acc_norm']:.1f} | {r['global_sparsity']:.3f} "
                     f"| {r['prune_seconds']:.1f} |")
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def time_pruners(model, calib, a, out: Path) -> None:
    """Wall-clock of each pruner at uniform sparsity, twice (the first includes compilation)."""
    dense = kernels(model)
    L = model.cfg.num_layers
    for target in (float(s) for s in a.sparsities.split(",")):
        for method in a.methods.split(","):
            for rep in range(2):
                restore(model, dense)
                t0 = time.perf_counter()
                needs = PRUNERS[method].calibration is not None
                prune_model(model, np.full(7 * L, target), method, calib if needs else None,
                            batch_size=8)
                jax.block_until_ready(kernels(model))
                row = {"target": target, "method": method, "rep": rep,
                       "seconds": round(time.perf_counter() - t0, 2), "n_calib": a.n_calib,
                       "calib_len": a.calib_len, "cpu_count": os.cpu_count()}
                with (out / "timing.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(row, flush=True)
    restore(model, dense)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores", required=True, help="LayerIF scores.json (layerif scores)")
    p.add_argument("--aggregate", default="+ve")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--sparsities", default="0.5,0.7")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--calib", default=None, help="calibration text/task file "
                   "(default: OpenBookQA train, disjoint from every evaluation set)")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--ppl-window", type=int, default=512)
    p.add_argument("--mc-tasks", default=",".join(MC_TASKS))
    p.add_argument("--mc-limit", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny calibration and evaluation")
    p.add_argument("--time-only", action="store_true",
                   help="only time the pruners (no evaluation, no table): OUT/timing.jsonl")
    a = p.parse_args(argv)
    if a.quick:
        a.n_calib, a.calib_len, a.ppl_tokens, a.mc_limit = 8, 128, 2048, 10
    a.mc_tasks = [t for t in a.mc_tasks.split(",") if t]
    data = shared_data_dir()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done = {(r["target"], r["method"], r["allocation"]) for r in rows}

    model_path = a.model or default_model_path()
    model = load_model(model_path)
    tok = load_tokenizer(model_path)
    cfg = model.cfg
    dense = kernels(model)
    calib = calibration_ids(tok, a.calib or data / "layerif-tasks" / "qa_openbook_train_all.json",
                            a.n_calib, a.calib_len, seed=0)

    if a.time_only:
        time_pruners(model, calib, a, out)
        return
    meta_path = out / "metrics.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if "mean_acc_norm" not in meta["dense"]:  # written by an older version of this script
            meta["dense"] = evaluate(model, tok, a, data)
            with atomic_path(meta_path) as tmp:
                Path(tmp).write_text(json.dumps(meta, indent=1))
    else:
        t0 = time.perf_counter()
        alpha = alpha_per_matrix(model)
        t_alpha = time.perf_counter() - t0
        t0 = time.perf_counter()
        owl = outlier_ratios(model, calib, progress=False)
        t_owl = time.perf_counter() - t0
        meta = {"model": str(model_path), "scores": a.scores, "aggregate": a.aggregate,
                "layerif": read_metric(a.scores, "layer_scores", a.aggregate).tolist(), "alpha": alpha.tolist(),
                "owl_outlier_ratios": owl.tolist(), "alpha_seconds": round(t_alpha, 2),
                "owl_seconds": round(t_owl, 2), "n_calib": a.n_calib, "calib_len": a.calib_len,
                "ppl_tokens": a.ppl_tokens, "ppl_window": a.ppl_window, "mc_tasks": a.mc_tasks,
                "mc_limit": a.mc_limit, "jax": jax.__version__, "backend": jax.default_backend(),
                "cpu_count": os.cpu_count(), "platform": platform.platform()}
        t0 = time.perf_counter()
        meta["dense"] = evaluate(model, tok, a, data)
        print(f"dense: {meta['dense']}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        with atomic_path(meta_path) as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=1))

    metric = {"layer_scores": np.asarray(meta["layerif"]), "alpha": np.asarray(meta["alpha"]),
              "outlier_ratios": np.asarray(meta["owl_outlier_ratios"])}
    for target in (float(s) for s in a.sparsities.split(",")):
        for method in a.methods.split(","):
            for scheme in a.schemes.split(","):
                if (target, method, scheme) in done:
                    continue
                restore(model, dense)
                eps = DEFAULT_EPSILON[method]
                s = layer_sparsities(scheme, param_counts=cfg.param_counts(), target=target,
                                     epsilon=eps, **metric)
                t0 = time.perf_counter()
                needs = PRUNERS[method].calibration is not None
                _, report = prune_model(model, s, method, calib if needs else None, batch_size=8)
                jax.block_until_ready(kernels(model))
                t_prune = time.perf_counter() - t0
                row = {"target": target, "method": method, "allocation": scheme, "epsilon": eps,
                       "global_sparsity": global_sparsity(model),
                       "prune_seconds": round(t_prune, 2),
                       "per_block_sparsity": np.asarray(list(report.values()))
                       .reshape(cfg.num_layers, 7).mean(1).round(4).tolist()}
                row.update(evaluate(model, tok, a, data))
                rows.append(row)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                write_table(rows, out / "table.md", a)
                print(f"{target:g} {method:9s} {scheme:12s} ppl {row['ppl']:9.2f} "
                      f"acc {100 * row['mean_acc']:5.1f} prune {t_prune:6.1f} s "
                      f"eval {row['eval_seconds']:6.1f} s", flush=True)
    restore(model, dense)


if __name__ == "__main__":
    main()
