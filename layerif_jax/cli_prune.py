"""`layerif prune` and `layerif eval {ppl,mc}` (METHOD.md section 5).

Wired into the main parser with `cli_prune.register(subparsers)`. Every user error
raises LayerIFError (printed as one line, exit code 2, by `cli.main`).
"""

from __future__ import annotations

import json
import time

from .cli_common import add_model as _add_model, load_model_and_tokenizer as _load
from .cli_common import positive_int as _positive_int
from .cli_common import read_scores
from .errors import LayerIFError

ALLOCATIONS = ("layerif", "reversed", "uniform", "alphapruning", "owl")
DEFAULT_EPSILON = {"magnitude": 0.3, "wanda": 0.1, "sparsegpt": 0.1}


# -- helpers -----------------------------------------------------------------------
def parse_nm(s: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4)."""
    if s is None:
        return None
    try:
        n, m = (int(x) for x in str(s).split(":"))
    except ValueError:
        raise LayerIFError(f"--nm must look like 2:4, got {s!r}") from None
    if not (m >= 2 and 1 <= n < m):
        raise LayerIFError(f"--nm {s}: need 1 <= N < M")
    return n, m


# -- prune -------------------------------------------------------------------------
def cmd_prune(a):
    import numpy as np
    from .allocate import layer_sparsities
    from .io import write_json
    from .model.checkpoints import export_hf
    from .prune import (alpha_per_matrix, calibration_ids, global_sparsity, outlier_ratios,
                        prune_model)

    t0 = time.perf_counter()
    progress = not getattr(a, "quiet", False)
    nm = parse_nm(a.nm)
    allocation = a.allocation or ("uniform" if nm else "layerif")
    target = a.sparsity
    if nm is not None:
        if allocation != "uniform":
            raise LayerIFError(f"--nm {a.nm} fixes every sparsity at {nm[0]}/{nm[1]}: "
                               "use --allocation uniform")
        if target is not None and abs(target - nm[0] / nm[1]) > 1e-9:
            raise LayerIFError(f"--nm {a.nm} means sparsity {nm[0] / nm[1]:g}, not {target}")
        target = nm[0] / nm[1]
    if target is None:
        raise LayerIFError("--sparsity is required (or give --nm)")
    if not 0 < target < 1:
        raise LayerIFError(f"--sparsity must be in (0, 1), got {target}")
    if allocation in ("layerif", "reversed") and not a.scores:
        raise LayerIFError(f"--allocation {allocation} needs --scores (LayerIF scores.json)")
    needs_calib = a.method != "magnitude" or (allocation == "owl" and not a.scores)
    if needs_calib and not a.calib:
        raise LayerIFError(f"--method {a.method}"
                           + (" / --allocation owl" if allocation == "owl" else "")
                           + " needs --calib (a text file or a task JSON)")
    epsilon = a.epsilon if a.epsilon is not None else DEFAULT_EPSILON[a.method]

    model, tok, path = _load(a.model, a.dtype)
    cfg = model.cfg
    calib = None
    if needs_calib:
        calib = calibration_ids(tok, a.calib, a.n_calib, a.calib_len, a.seed)

    metric = None
    kw = dict(param_counts=cfg.param_counts(), target=target, epsilon=epsilon,
              smooth=not a.no_smooth, lam=a.lam)
    if allocation in ("layerif", "reversed"):
        metric = read_scores(a.scores, a.aggregate)
        kw["layer_scores"] = metric
    elif allocation == "alphapruning":
        metric = read_scores(a.scores, a.aggregate) if a.scores else alpha_per_matrix(model)
        kw["alpha"] = metric
    elif allocation == "owl":
        metric = (read_scores(a.scores, a.aggregate) if a.scores else
                  outlier_ratios(model, calib, M=a.owl_m, batch_size=a.batch_size,
                                 progress=progress))
        kw["outlier_ratios"] = metric
    sparsities = None if nm else layer_sparsities(allocation, **kw)

    _, report = prune_model(model, sparsities, a.method, calib, nm=nm,
                            batch_size=a.batch_size, blocksize=a.blocksize,
                            percdamp=a.percdamp, progress=progress)
    achieved = global_sparsity(model)
    out = export_hf(model, a.out, tokenizer=tok, overwrite=a.overwrite)
    requested = (np.full(7 * cfg.num_layers, target) if sparsities is None
                 else np.asarray(sparsities))
    write_json(out / "prune_report.json", {
        "model": path, "method": a.method, "allocation": allocation, "target": target,
        "epsilon": epsilon, "nm": f"{nm[0]}:{nm[1]}" if nm else None,
        "scores": a.scores, "metric": None if metric is None else np.asarray(metric),
        "calib": a.calib, "n_calib": a.n_calib if calib is not None else 0,
        "calib_len": a.calib_len if calib is not None else 0, "seed": a.seed,
        "blocksize": a.blocksize, "percdamp": a.percdamp,
        "global_sparsity": achieved,
        "requested": dict(zip(report, requested.tolist())),
        "achieved": report,
        "per_block_mean": np.asarray(list(report.values())).reshape(cfg.num_layers, 7).mean(1),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    print(f"pruned {path} ({a.method}, {allocation}, target {target:g}): "
          f"global sparsity {achieved:.4f} -> {out}")


# -- eval --------------------------------------------------------------------------
def _emit(result, out):
    from .io import write_json
    print(json.dumps(result, indent=2, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    if out:
        write_json(out, result)


def cmd_eval_ppl(a):
    from .evaluate import perplexity
    model, tok, path = _load(a.model, a.dtype)
    res = perplexity(model, tok, a.data, window=a.window, max_tokens=a.max_tokens,
                     batch_size=a.batch_size, progress=not getattr(a, "quiet", False))
    _emit({"model": path, "data": str(a.data), **res}, a.out)


def cmd_eval_mc(a):
    from .evaluate import mc_accuracy
    model, tok, path = _load(a.model, a.dtype)
    results = [mc_accuracy(model, tok, t, a.limit, style=a.style, batch_size=a.batch_size,
                           max_len=a.max_len, progress=not getattr(a, "quiet", False))
               for t in a.task]
    mean = sum(r["accuracy"] for r in results) / len(results)
    _emit({"model": path, "style": a.style, "tasks": results, "mean_accuracy": mean}, a.out)


# -- parser ------------------------------------------------------------------------
def register(sub) -> None:
    """Add `prune` and `eval` to the main parser's subparsers."""
    s = sub.add_parser("prune", help="prune a model (magnitude / Wanda / SparseGPT) with a "
                                     "per-layer sparsity allocation")
    _add_model(s)
    s.add_argument("--sparsity", type=float, help="global target sparsity in (0, 1)")
    s.add_argument("--allocation", choices=ALLOCATIONS,
                   help="per-layer sparsity scheme (default: layerif; uniform with --nm)")
    s.add_argument("--scores", help="layerif/reversed: LayerIF scores.json or .npy; "
                                    "alphapruning/owl: precomputed metric (else computed)")
    s.add_argument("--aggregate", default="+ve", choices=["+ve", "top25", "all"],
                   help="which aggregate to read from a scores.json")
    s.add_argument("--epsilon", type=float,
                   help="allocation range (default 0.3 magnitude, 0.1 wanda/sparsegpt)")
    s.add_argument("--no-smooth", action="store_true", help="no Savitzky-Golay smoothing")
    s.add_argument("--lam", type=float, default=0.08, help="OWL lambda")
    s.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    s.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    s.add_argument("--nm", help="N:M semi-structured sparsity, e.g. 2:4 or 4:8")
    s.add_argument("--calib", help="calibration text file or task JSON/JSONL")
    s.add_argument("--n-calib", type=_positive_int, default=128, help="calibration windows")
    s.add_argument("--calib-len", type=_positive_int, default=256, help="tokens per window")
    s.add_argument("--seed", type=int, default=0, help="calibration window sampling seed")
    s.add_argument("--batch-size", type=_positive_int, default=8,
                   help="calibration windows per forward pass")
    s.add_argument("--blocksize", type=_positive_int, default=128, help="SparseGPT block size")
    s.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening")
    s.add_argument("--out", required=True, help="output HF safetensors dir (+ prune_report.json)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_prune)

    e = sub.add_parser("eval", help="perplexity or zero-shot multiple-choice accuracy")
    esub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = esub.add_parser("ppl", help="perplexity on raw text (WikiText-2 style)")
    _add_model(p)
    p.add_argument("--data", required=True, help="raw text file (e.g. wiki.test.raw)")
    p.add_argument("--window", type=_positive_int, default=1024, help="tokens per window")
    p.add_argument("--max-tokens", type=_positive_int, help="use only the first N tokens")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--out", help="also write the result JSON here")
    p.set_defaults(fn=cmd_eval_ppl)
    m = esub.add_parser("mc", help="zero-shot multiple choice by answer log-likelihood")
    _add_model(m)
    m.add_argument("--task", required=True, nargs="+", help="task JSON/JSONL file(s)")
    m.add_argument("--limit", type=_positive_int, help="first N records of each task")
    m.add_argument("--style", default="text", choices=["text", "letter"],
                   help="QA candidates: choice texts (zero-shot) or the fine-tuning format")
    m.add_argument("--batch-size", type=_positive_int, default=8)
    m.add_argument("--max-len", type=_positive_int, help="truncate prompts (default: context)")
    m.add_argument("--out", help="also write the result JSON here")
    m.set_defaults(fn=cmd_eval_mc)
