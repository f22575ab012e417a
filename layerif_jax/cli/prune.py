"""`layerif prune`: magnitude / Wanda / SparseGPT with a per-layer sparsity allocation."""

from __future__ import annotations

import dataclasses
import time

from ..errors import LayerIFError
from .common import (AGGREGATES, PRUNE_METHODS, Command, ModelArgs, OverwriteArgs,
                     load_model_checked, load_tokenizer_of, out_dir, pruner_settings)
from .options import (REQUIRED, fraction, input_file, nonneg_float, nonneg_int, opt,
                      output_path, positive_float, positive_int, unit_interval)

ALLOCATIONS = ("layerif", "reversed", "uniform", "alphapruning", "owl")


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


@dataclasses.dataclass(frozen=True)
class PruneConfig(OverwriteArgs, ModelArgs):
    sparsity: float | None = opt(None, "global target sparsity in (0, 1)", type=fraction,
                                 shown="required unless --nm")
    allocation: str | None = opt(None, "per-layer sparsity scheme", choices=ALLOCATIONS,
                                 shown="layerif; uniform with --nm")
    scores: str | None = opt(None, "layerif/reversed: LayerIF scores.json or .npy; "
                                   "alphapruning/owl: a precomputed metric (else computed)",
                             type=input_file("scores file"), shown="none")
    aggregate: str = opt("+ve", "which aggregate to read from a scores file", choices=AGGREGATES)
    epsilon: float | None = opt(None, "range of the allocation's linear map",
                                type=unit_interval, shown="0.3 magnitude, 0.1 wanda/sparsegpt")
    no_smooth: bool = opt(False, "no Savitzky-Golay smoothing")
    lam: float = opt(0.08, "OWL lambda", type=unit_interval)
    owl_m: float = opt(5.0, "OWL outlier threshold M", type=positive_float)
    method: str = opt("wanda", "pruner", choices=PRUNE_METHODS)
    nm: str | None = opt(None, "N:M semi-structured sparsity, e.g. 2:4 or 4:8", shown="none")
    calib: str | None = opt(None, "calibration text file or task JSON/JSONL",
                            type=input_file("calibration file"), shown="none")
    n_calib: int = opt(128, "calibration windows", type=positive_int)
    calib_len: int = opt(256, "tokens per calibration window", type=positive_int)
    seed: int = opt(0, "calibration window sampling seed", type=nonneg_int)
    batch_size: int = opt(8, "calibration windows per forward pass", type=positive_int)
    blocksize: int = opt(128, "SparseGPT block size", type=positive_int)
    percdamp: float = opt(0.01, "SparseGPT dampening (fraction of the mean diagonal)",
                          type=nonneg_float)
    out: str = opt(REQUIRED, "output HF safetensors dir (+ prune_report.json)", type=output_path)

    def __post_init__(self):
        nm = parse_nm(self.nm)
        allocation = self.allocation or ("uniform" if nm else "layerif")
        target = self.sparsity
        if nm is not None:
            if allocation != "uniform":
                raise LayerIFError(f"--nm {self.nm} fixes every sparsity at {nm[0]}/{nm[1]}: "
                                   "use --allocation uniform")
            if target is not None and abs(target - nm[0] / nm[1]) > 1e-9:
                raise LayerIFError(f"--nm {self.nm} means sparsity {nm[0] / nm[1]:g}, "
                                   f"not {target}")
            target = nm[0] / nm[1]
        if target is None:
            raise LayerIFError("--sparsity is required (or give --nm)")
        if allocation in ("layerif", "reversed") and not self.scores:
            raise LayerIFError(f"--allocation {allocation} needs --scores (LayerIF scores.json)")
        if self.needs_calib(allocation) and not self.calib:
            raise LayerIFError(f"--method {self.method}"
                               + (" / --allocation owl" if allocation == "owl" else "")
                               + " needs --calib (a text file or a task JSON)")
        object.__setattr__(self, "allocation", allocation)
        object.__setattr__(self, "sparsity", target)

    def needs_calib(self, allocation: str) -> bool:
        from ..applications.prune import PRUNERS
        return (PRUNERS[self.method].calibration is not None
                or (allocation == "owl" and not self.scores))


def run(cfg: PruneConfig, rt) -> None:
    import numpy as np

    from ..applications.allocation import layer_sparsities, read_metric
    from ..formats import export_hf
    from ..applications.prune import (alpha_per_matrix, calibration_ids, global_sparsity, outlier_ratios,
                         prune_model)

    t0 = time.perf_counter()
    nm = parse_nm(cfg.nm)
    from ..applications.prune import DEFAULT_EPSILON
    epsilon = cfg.epsilon if cfg.epsilon is not None else DEFAULT_EPSILON[cfg.method]
    with out_dir(cfg.out, "prune", cfg.overwrite) as out:
        source = cfg.model_source()
        tok = load_tokenizer_of(source)
        model = load_model_checked(source, cfg.dtype, tok)
        mcfg = model.cfg
        calib = (calibration_ids(tok, cfg.calib, cfg.n_calib, cfg.calib_len, cfg.seed)
                 if cfg.needs_calib(cfg.allocation) else None)
        metric = None
        kw = dict(param_counts=mcfg.param_counts(), target=cfg.sparsity, epsilon=epsilon,
                  smooth=not cfg.no_smooth, lam=cfg.lam)
        if cfg.allocation in ("layerif", "reversed"):
            metric = kw["layer_scores"] = read_metric(cfg.scores, "layer_scores", cfg.aggregate)
        elif cfg.allocation == "alphapruning":
            metric = kw["alpha"] = (read_metric(cfg.scores, "alpha") if cfg.scores
                                    else alpha_per_matrix(model))
        elif cfg.allocation == "owl":
            metric = kw["outlier_ratios"] = (
                read_metric(cfg.scores, "outlier_ratios") if cfg.scores else
                outlier_ratios(model, calib, M=cfg.owl_m, batch_size=cfg.batch_size,
                               progress=rt.progress))
        sparsities = None if nm else layer_sparsities(cfg.allocation, **kw)
        _, report = prune_model(model, sparsities, cfg.method, calib, nm=nm,
                                batch_size=cfg.batch_size, progress=rt.progress,
                                **pruner_settings(cfg.method, blocksize=cfg.blocksize,
                                                  percdamp=cfg.percdamp))
        achieved = global_sparsity(model)
        requested = (np.full(7 * mcfg.num_layers, cfg.sparsity) if sparsities is None
                     else np.asarray(sparsities))
        report_json = {
            "model": source, "method": cfg.method, "allocation": cfg.allocation,
            "target": cfg.sparsity, "epsilon": epsilon, "nm": f"{nm[0]}:{nm[1]}" if nm else None,
            "scores": cfg.scores, "metric": None if metric is None else np.asarray(metric),
            "calib": cfg.calib, "n_calib": cfg.n_calib if calib is not None else 0,
            "calib_len": cfg.calib_len if calib is not None else 0, "seed": cfg.seed,
            "blocksize": cfg.blocksize, "percdamp": cfg.percdamp, "global_sparsity": achieved,
            "requested": dict(zip(report, requested.tolist())), "achieved": report,
            "per_block_mean": np.asarray(list(report.values())).reshape(
                mcfg.num_layers, 7).mean(1),
            "seconds": round(time.perf_counter() - t0, 2)}
        export_hf(model, out, tokenizer=tok, extra_json={"prune_report.json": report_json})
    print(f"pruned {source} ({cfg.method}, {cfg.allocation}, target {cfg.sparsity:g}): "
          f"global sparsity {achieved:.4f} -> {out.path}")


COMMAND = Command("prune", "prune a model (magnitude / Wanda / SparseGPT) with a per-layer "
                           "sparsity allocation", PruneConfig, run)
