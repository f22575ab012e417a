"""`layerif run`: the whole method on the embedded default (or on your data).

LoRA fine-tune -> LayerIF layer scores -> expert allocation (METHOD.md section 4) and
sparsity allocation (section 5) for LayerIF and the baselines -> a report
(OUT/run.json, OUT/allocation.json, OUT/allocation.png). With `--full` it goes on:
LoRA-MoE training with the LayerIF and the uniform allocation, and pruning with the
LayerIF and the uniform sparsities, each evaluated (OUT/full.json).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .cli_common import add_model, load_model_and_tokenizer, positive_float, positive_int


def allocations(scores: dict[str, np.ndarray], alpha: np.ndarray, cfg, *, total: int,
                beta: float, sparsity: float, epsilon: float) -> dict:
    """Experts per layer and sparsity per matrix for LayerIF and the baselines."""
    from . import allocate
    L = cfg.num_layers
    experts = {
        "layerif": allocate.expert_counts(scores["+ve"], total, beta),
        "layerif-top25": allocate.expert_counts(scores["top25"], total, beta),
        "uniform": allocate.uniform_experts(L, total),
        "mola-2-4-6-8": allocate.mola_experts(L, total, "2-4-6-8"),
        "alphalora": allocate.alphalora_experts(alpha, total, beta),
    }
    kw = dict(param_counts=cfg.param_counts(), target=sparsity, epsilon=epsilon)
    sparsities = {
        "layerif": allocate.layer_sparsities("layerif", layer_scores=scores["+ve"], **kw),
        "reversed": allocate.layer_sparsities("reversed", layer_scores=scores["+ve"], **kw),
        "uniform": allocate.layer_sparsities("uniform", **kw),
        "alphapruning": allocate.layer_sparsities("alphapruning", alpha=alpha, **kw),
    }
    return {
        "experts": {k: v.astype(int).tolist() for k, v in experts.items()},
        "top_k": {k: allocate.top_k_per_layer(v).tolist() for k, v in experts.items()},
        "total": total, "beta": beta, "sparsity": sparsity, "epsilon": epsilon,
        "sparsity_per_matrix": {k: v.tolist() for k, v in sparsities.items()},
        "sparsity_per_block": {k: v.reshape(L, -1).mean(1).tolist()
                               for k, v in sparsities.items()},
    }


def plot_allocation(alloc: dict, scores: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.4), sharex=True)
    x = np.arange(len(scores))
    axes[0].bar(x, scores, color="tab:blue")
    axes[0].set_ylabel("S (LayerIF, +ve)")
    for ax, key, unit in ((axes[1], "experts", "experts"),
                          (axes[2], "sparsity_per_block", "sparsity")):
        methods = list(alloc[key])
        w = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar(x + (i - (len(methods) - 1) / 2) * w, alloc[key][m], w, label=m)
        ax.set_ylabel(unit)
        ax.legend(ncol=len(methods), fontsize=8)
    axes[1].set_title(f"experts per layer (T = {alloc['total']}, beta = {alloc['beta']})",
                      fontsize=9)
    axes[2].set_title(f"sparsity per block (target {alloc['sparsity']:g}, "
                      f"epsilon {alloc['epsilon']:g})", fontsize=9)
    axes[2].set_xlabel("layer (decoder block)")
    fig.tight_layout()
    from .io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _ppl_text(a, tmp: Path) -> tuple[Path, int]:
    """WikiText-2 test (shared data) if present, else the validation records' text."""
    from .io import shared_data_dir
    from .prune import calibration_text
    d = shared_data_dir()
    if d is not None and (d / "wikitext-2-raw" / "wiki.test.raw").is_file():
        return d / "wikitext-2-raw" / "wiki.test.raw", 256
    p = tmp / "val.txt"
    p.write_text(calibration_text(a.val), encoding="utf-8")
    return p, 64


def run_full(a, path: str, alloc: dict, out: Path, progress: bool) -> dict:
    """LoRA-MoE (LayerIF vs uniform experts) and pruning (LayerIF vs uniform sparsity)."""
    from flax import nnx

    from .cli import _examples
    from .evaluate import perplexity
    from .model.checkpoints import load_model
    from .model.tokenizer import load_tokenizer
    from .moe import MoELoraModel, accuracy, train_moe
    from .prune import calibration_ids, global_sparsity, prune_model
    from .train import TrainConfig

    tok = load_tokenizer(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res: dict = {"moe": {}, "prune": {}}
    train = _examples(tok, a.train, a.n_train, a.max_len)
    cfg = TrainConfig(epochs=a.moe_epochs, lr=a.lr, warmup_steps=2, batch_size=8,
                      max_len=a.max_len, seed=0)
    for method in ("layerif", "uniform"):
        t0 = time.perf_counter()
        moe = MoELoraModel(load_model(path, a.dtype), alloc["experts"][method],
                           top_k=alloc["top_k"][method], rngs=nnx.Rngs(0))
        hist = train_moe(moe, train, out / "moe" / method, cfg, pad_id=pad, progress=progress,
                         base_model_name=path)
        t_train = time.perf_counter() - t0
        acc = accuracy(moe, tok, a.val, a.n_eval, "loglik")
        res["moe"][method] = {"accuracy": acc["accuracy"], "n": acc["n"],
                              "final_train_loss": hist["train_loss"][-1],
                              "train_seconds": round(t_train, 1)}
        print(f"MoE-LoRA ({method} experts): accuracy {acc['accuracy']:.3f} on {acc['n']} "
              f"records, {t_train:.0f} s")

    model = load_model(path, a.dtype)
    dense = {n: lin.kernel[...] for n, lin in model.layers.linears().items()}
    calib = calibration_ids(tok, a.train, a.n_calib, a.calib_len, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        text, window = _ppl_text(a, Path(tmp))

        def evaluate():
            ppl = perplexity(model, tok, text, window=window, max_tokens=a.ppl_tokens,
                             progress=False)
            acc = accuracy(model, tok, a.val, a.n_eval, "loglik")
            return {"perplexity": ppl["perplexity"], "ppl_tokens": ppl["n_tokens"],
                    "ppl_text": str(text), "accuracy": acc["accuracy"]}

        res["prune"]["dense"] = evaluate()
        for scheme in ("layerif", "uniform"):
            for n, lin in model.layers.linears().items():
                lin.kernel.set_value(dense[n])
            t0 = time.perf_counter()
            prune_model(model, alloc["sparsity_per_matrix"][scheme], a.prune_method, calib,
                        progress=progress)
            t_prune = time.perf_counter() - t0
            r = evaluate()
            r.update(global_sparsity=global_sparsity(model), prune_seconds=round(t_prune, 1),
                     method=a.prune_method)
            res["prune"][scheme] = r
            print(f"pruned ({a.prune_method}, {scheme} sparsities, target {a.sparsity:g}): "
                  f"perplexity {r['perplexity']:.2f}, accuracy {r['accuracy']:.3f}")
    return res


def cmd_run(a):
    """The main job: fine-tune, score, allocate, report (and with --full, use them)."""
    from .cli import _finetune, _scores, command_defaults
    from .io import OutputDir, write_json
    from .prune import alpha_per_matrix

    from .allocate import _check_sparsity_args, _check_total

    t0 = time.perf_counter()
    out = Path(a.out)
    progress = not a.quiet
    _check_sparsity_args(a.sparsity, a.epsilon, 0.99)  # bad input fails before any work
    model, tok, path = load_model_and_tokenizer(a.model, a.dtype)
    _check_total(model.cfg.num_layers, a.total or 5 * model.cfg.num_layers)
    print(f"model: {path}")
    ft = command_defaults(
        "finetune", lr=a.lr, warmup=min(2, -(-a.n_train // 8) - 1),  # >= 1 step at lr > 0
        max_len=a.max_len, data=a.train, limit=a.n_train, quiet=a.quiet)
    hist = _finetune(model, tok, ft, path, out / "finetune")
    print(f"fine-tuned LoRA on {ft.limit} records of {a.train} -> {out / 'finetune' / 'adapter'}")
    sc = command_defaults("scores", train=a.train, val=a.val, n_train=a.n_train, n_val=a.n_val,
                          max_len=a.max_len, quiet=a.quiet)
    res = _scores(model, tok, sc, path, out / "scores", out / "finetune" / "adapter")
    print(f"layer scores: {out / 'scores' / 'scores.json'} (plot: {out / 'scores' / 'scores.png'})")

    t1 = time.perf_counter()
    alpha = alpha_per_matrix(model)  # the base weights (the LoRA is not merged)
    scores = {k: res.aggregated(k) for k in ("+ve", "top25")}
    alloc = allocations(scores, alpha, model.cfg, total=a.total or 5 * model.cfg.num_layers,
                        beta=a.beta, sparsity=a.sparsity, epsilon=a.epsilon)
    alloc["alpha_per_matrix"] = alpha.tolist()
    with OutputDir(out / "report", "report") as od, od.staging() as tmp:
        write_json(tmp / "allocation.json", alloc)
        plot_allocation(alloc, scores["+ve"], tmp / "allocation.png")
    t_alloc = time.perf_counter() - t1
    print("experts (LayerIF): " + " ".join(map(str, alloc["experts"]["layerif"])))
    print("sparsity per block (LayerIF): "
          + " ".join(f"{s:.3f}" for s in alloc["sparsity_per_block"]["layerif"]))
    print(f"allocations: {out / 'report' / 'allocation.json'} "
          f"(plot: {out / 'report' / 'allocation.png'})")

    summary = {
        "model": path, "train": str(a.train), "val": str(a.val), "n_train": a.n_train,
        "n_val": a.n_val,
        "finetune_final": hist.get("epochs", [{}])[-1] if hist.get("epochs") else {},
        "layer_scores": res.layer_scores, "scores_seconds": round(res.seconds, 1),
        "allocation_seconds": round(t_alloc, 1),
        "experts_layerif": alloc["experts"]["layerif"],
        "sparsity_per_block_layerif": alloc["sparsity_per_block"]["layerif"],
    }
    if a.full:
        del model
        summary["full"] = run_full(a, path, alloc, out, progress)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "run.json", summary)
    print(f"summary: {out / 'run.json'}  [{time.perf_counter() - t0:.0f} s]")


def register(sub, assets: Path) -> None:
    s = sub.add_parser("run", help="the whole method on the embedded default (SmolLM2 + MRPC "
                       "slice): fine-tune, scores, allocations; --full also trains and prunes")
    add_model(s, required=False)
    s.add_argument("--train", default=str(assets / "mrpc_train_64.json"))
    s.add_argument("--val", default=str(assets / "mrpc_validation_16.json"))
    s.add_argument("--n-train", type=positive_int, default=32)
    s.add_argument("--n-val", type=positive_int, default=8)
    s.add_argument("--max-len", type=positive_int, default=96)
    s.add_argument("--lr", type=positive_float, default=1e-3)
    s.add_argument("--total", type=positive_int, help="experts in total (default 5 per layer)")
    s.add_argument("--beta", type=positive_float, default=2.5)
    s.add_argument("--sparsity", type=float, default=0.5, help="global pruning target")
    s.add_argument("--epsilon", type=float, default=0.1)
    s.add_argument("--full", action="store_true",
                   help="also train LoRA-MoE and prune, with evaluation")
    s.add_argument("--moe-epochs", type=positive_int, default=1)
    s.add_argument("--n-eval", type=positive_int, default=16, help="validation records to score")
    s.add_argument("--prune-method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    s.add_argument("--n-calib", type=positive_int, default=16)
    s.add_argument("--calib-len", type=positive_int, default=128)
    s.add_argument("--ppl-tokens", type=positive_int, default=8192)
    s.add_argument("--out", default="layerif_runs/default")
    s.set_defaults(fn=cmd_run)
