"""`layerif run`: the whole method on the embedded default (or on your data).

LoRA fine-tune -> LayerIF layer scores -> expert allocation (METHOD.md section 4) and
sparsity allocation (section 5) for LayerIF and the baselines -> a report
(OUT/run.json, OUT/report/allocation.json, OUT/report/allocation.png). With `--full` it
goes on: LoRA-MoE training with the LayerIF and the uniform allocation, and pruning with
the LayerIF and the uniform sparsities, each evaluated (OUT/run.json "full").
A rerun into the same OUT resumes the fine-tune (or reuses the finished one) when the
data, model and settings are the same, and is refused when they are not.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from .common import PRUNE_METHODS, Command, ModelArgs, OverwriteArgs, out_dir
from .finetune import FinetuneConfig, finetune_into
from .options import (data_file, fraction, opt, output_path, positive_float, positive_int,
                      unit_interval)
from .scores import ScoresConfig, compute as compute_scores, write as write_scores

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PARTS = ("finetune", "scores", "report", "moe", "run.json")


@dataclasses.dataclass(frozen=True)
class RunConfig(OverwriteArgs, ModelArgs):
    train: str = opt(str(ASSETS / "mrpc_train_64.json"), "training records", type=data_file,
                     shown="the 64 MRPC training records shipped in the package")
    val: str = opt(str(ASSETS / "mrpc_validation_16.json"), "validation records",
                   type=data_file, shown="the 16 MRPC validation records shipped")
    n_train: int = opt(32, "training records used (fine-tune and scores)", type=positive_int)
    n_val: int = opt(8, "validation records used for the scores", type=positive_int)
    max_len: int = opt(96, "tokens per example", type=positive_int)
    lr: float = opt(1e-3, "fine-tuning learning rate", type=positive_float)
    checkpoint_every: int = opt(50, "fine-tuning checkpoint every N steps", type=positive_int)
    total: int | None = opt(None, "experts in total", type=positive_int, shown="5 per layer")
    beta: float = opt(2.5, "exponent of the expert power mapping", type=positive_float)
    sparsity: float = opt(0.5, "global pruning target", type=fraction)
    epsilon: float = opt(0.1, "range of the sparsity map", type=unit_interval)
    full: bool = opt(False, "also train LoRA-MoE and prune, with evaluation")
    moe_epochs: int = opt(1, "--full: MoE training epochs", type=positive_int)
    n_eval: int = opt(16, "--full: validation records to evaluate", type=positive_int)
    prune_method: str = opt("wanda", "--full: pruner", choices=PRUNE_METHODS)
    n_calib: int = opt(16, "--full: calibration windows", type=positive_int)
    calib_len: int = opt(128, "--full: tokens per calibration window", type=positive_int)
    ppl_tokens: int = opt(8192, "--full: perplexity tokens", type=positive_int)
    out: str = opt("layerif_runs/default", "output dir", type=output_path)

    def __post_init__(self):
        from ..applications.allocation import check_sparsity_args
        check_sparsity_args(self.sparsity, self.epsilon, 0.99)


def allocations(scores: dict, alpha, cfg, *, total: int, beta: float, sparsity: float,
                epsilon: float) -> dict:
    """Experts per layer and sparsity per matrix for LayerIF and the baselines."""
    from ..applications import allocation as allocate

    L = cfg.num_layers
    names = cfg.matrix_names()
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
        "sparsity_per_matrix": {k: dict(zip(names, v.tolist())) for k, v in sparsities.items()},
        "sparsity_per_block": {k: v.reshape(L, -1).mean(1).tolist()
                               for k, v in sparsities.items()},
        "layer_scores_by_aggregate": {k: list(map(float, v)) for k, v in scores.items()},
        "alpha_per_matrix": dict(zip(names, map(float, alpha))),
    }


def plot_allocation(alloc: dict, scores, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _ppl_text(val: str, tmp: Path) -> tuple[Path, int]:
    """WikiText-2 test (shared data) if present, else the validation records' text."""
    from ..io import shared_data_dir
    from ..applications.prune import calibration_text
    d = shared_data_dir()
    if d is not None and (d / "wikitext-2-raw" / "wiki.test.raw").is_file():
        return d / "wikitext-2-raw" / "wiki.test.raw", 256
    p = tmp / "val.txt"
    p.write_text(calibration_text(val), encoding="utf-8")
    return p, 64


def run_full(cfg: RunConfig, source: str, tok, alloc: dict, out: Path, rt) -> dict:
    """LoRA-MoE (LayerIF vs uniform experts) and pruning (LayerIF vs uniform sparsity)."""
    from flax import nnx

    from ..evaluation import perplexity
    from ..io import OutputDir
    from ..formats import load_model
    from ..applications.moe import MoELoraModel, train_moe
    from ..evaluation import accuracy
    from ..applications.prune import calibration_ids, global_sparsity, prune_model
    from ..training import TrainConfig
    from .common import examples, pad_id

    res: dict = {"moe": {}, "prune": {}}
    train = examples(tok, cfg.train, cfg.n_train, cfg.max_len, what="training records")
    tcfg = TrainConfig(epochs=cfg.moe_epochs, lr=cfg.lr, warmup_steps=2, batch_size=8,
                       max_len=cfg.max_len, seed=0, checkpoint_every=cfg.checkpoint_every)
    for method in ("layerif", "uniform"):
        t0 = time.perf_counter()
        moe = MoELoraModel(load_model(source, cfg.dtype), alloc["experts"][method],
                           top_k=alloc["top_k"][method], rngs=nnx.Rngs(0))
        hist = train_moe(moe, train, OutputDir(out / "moe" / method, "moe train"), tcfg,
                         pad_id=pad_id(tok), progress=rt.progress, base_model_name=source)
        t_train = time.perf_counter() - t0
        acc = accuracy(moe, tok, cfg.val, cfg.n_eval, "loglik")
        res["moe"][method] = {"accuracy": acc["accuracy"], "n": acc["n"],
                              "final_train_loss": hist["train_loss"][-1],
                              "train_seconds": round(t_train, 1)}
        print(f"MoE-LoRA ({method} experts): accuracy {acc['accuracy']:.3f} on {acc['n']} "
              f"records, {t_train:.0f} s")

    model = load_model(source, cfg.dtype)
    dense = {n: lin.kernel[...] for n, lin in model.layers.linears().items()}
    calib = calibration_ids(tok, cfg.train, cfg.n_calib, cfg.calib_len, seed=0)
    names = model.cfg.matrix_names()
    with tempfile.TemporaryDirectory() as tmp:
        text, window = _ppl_text(cfg.val, Path(tmp))

        def evaluate():
            ppl = perplexity(model, tok, text, window=window, max_tokens=cfg.ppl_tokens,
                             progress=False)
            acc = accuracy(model, tok, cfg.val, cfg.n_eval, "loglik")
            return {"perplexity": ppl["perplexity"], "ppl_tokens": ppl["n_tokens"],
                    "ppl_text": str(text), "accuracy": acc["accuracy"]}

        res["prune"]["dense"] = evaluate()
        for scheme in ("layerif", "uniform"):
            for n, lin in model.layers.linears().items():
                lin.kernel.set_value(dense[n])
            t0 = time.perf_counter()
            per_matrix = alloc["sparsity_per_matrix"][scheme]
            prune_model(model, [per_matrix[k] for k in names], cfg.prune_method, calib,
                        progress=rt.progress)
            t_prune = time.perf_counter() - t0
            r = evaluate()
            r.update(global_sparsity=global_sparsity(model), prune_seconds=round(t_prune, 1),
                     method=cfg.prune_method)
            res["prune"][scheme] = r
            print(f"pruned ({cfg.prune_method}, {scheme} sparsities, target {cfg.sparsity:g}): "
                  f"perplexity {r['perplexity']:.2f}, accuracy {r['accuracy']:.3f}")
    return res


def run(cfg: RunConfig, rt) -> None:
    """The main job: fine-tune, score, allocate, report (and with --full, use them)."""
    from ..applications.allocation import check_total
    from ..io import OutputDir, write_json
    from ..applications.prune import alpha_per_matrix

    t0 = time.perf_counter()
    with out_dir(cfg.out, "run", cfg.overwrite) as out:
        out.claim(PARTS)
        root = out.path
        ft = FinetuneConfig(model=cfg.model, dtype=cfg.dtype, data=cfg.train, limit=cfg.n_train,
                            lr=cfg.lr, warmup=min(2, -(-cfg.n_train // 8) - 1),
                            max_len=cfg.max_len, checkpoint_every=cfg.checkpoint_every,
                            out=str(root / "finetune"))
        with OutputDir(root / "finetune", "finetune") as ft_out:
            hist, model, tok, source = finetune_into(ft, ft_out, rt)
        total = cfg.total or 5 * model.cfg.num_layers
        check_total(model.cfg.num_layers, total)
        print(f"model: {source}")
        print(f"fine-tuned LoRA on {cfg.n_train} records of {cfg.train} -> "
              f"{root / 'finetune' / 'adapter'}")
        sc = ScoresConfig(model=cfg.model, dtype=cfg.dtype, lora=str(root / "finetune"),
                          train=cfg.train, val=cfg.val, out=str(root / "scores"),
                          n_train=cfg.n_train, n_val=cfg.n_val, max_len=cfg.max_len)
        res, info = compute_scores(sc, rt, model=model, tok=tok, source=source)
        write_scores(res, OutputDir(root / "scores", "scores"), sc, info)
        print(f"layer scores: {root / 'scores' / 'scores.json'} "
              f"(plot: {root / 'scores' / 'scores.png'})")

        t1 = time.perf_counter()
        alpha = alpha_per_matrix(model)  # the base weights (the LoRA is not merged)
        scores = {k: res.aggregated(k) for k in ("+ve", "top25")}
        alloc = allocations(scores, alpha, model.cfg, total=total, beta=cfg.beta,
                            sparsity=cfg.sparsity, epsilon=cfg.epsilon)
        report = OutputDir(root / "report", "report")
        with report, report.staging() as tmp:
            write_json(tmp / "allocation.json", {**alloc, "written_by": "layerif run"})
            plot_allocation(alloc, scores["+ve"], tmp / "allocation.png")
        t_alloc = time.perf_counter() - t1
        print("experts (LayerIF): " + " ".join(map(str, alloc["experts"]["layerif"])))
        print("sparsity per block (LayerIF): "
              + " ".join(f"{s:.3f}" for s in alloc["sparsity_per_block"]["layerif"]))
        print(f"allocations: {root / 'report' / 'allocation.json'} "
              f"(plot: {root / 'report' / 'allocation.png'})")

        summary = {
            "model": source, "train": str(cfg.train), "val": str(cfg.val),
            "n_train": cfg.n_train, "n_val": cfg.n_val,
            "finetune_final": hist["epochs"][-1] if hist.get("epochs") else {},
            "finetune_resumed_from": hist.get("resumed_from"),
            "layer_scores": res.layer_scores, "scores_seconds": round(res.seconds, 1),
            "allocation_seconds": round(t_alloc, 1),
            "experts_layerif": alloc["experts"]["layerif"],
            "sparsity_per_block_layerif": alloc["sparsity_per_block"]["layerif"],
        }
        if cfg.full:
            del model
            summary["full"] = run_full(cfg, source, tok, alloc, root, rt)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        with out.staging(exclusive=False) as tmp:
            write_json(tmp / "run.json", {**summary, "written_by": "layerif run"})
    print(f"summary: {root / 'run.json'}  [{time.perf_counter() - t0:.0f} s]")


COMMAND = Command(
    "run", "the whole method on the embedded default (SmolLM2 + MRPC slice): fine-tune, "
           "scores, allocations; --full also trains and prunes", RunConfig, run,
    stopped="the fine-tune's last checkpoint is kept; run the same command again to resume",
    description=__doc__.split("\n\n", 1)[1])
