"""`layerif allocate experts|sparsity`: budgets per layer from scores (METHOD.md 4-5)."""

from __future__ import annotations

import dataclasses

from ..errors import LayerIFError
from .common import AGGREGATES, Command, Group, OverwriteArgs, out_file
from .options import (REQUIRED, fraction, input_file, model_path, opt,
                      output_path, positive_float, positive_int, unit_interval)

EXPERT_METHODS = ("layerif", "uniform", "alphalora", "mola:2-4-6-8", "mola:8-6-4-2",
                  "mola:5-5-5-5", "mola:8-2-2-8")
SPARSITY_SCHEMES = ("layerif", "reversed", "uniform", "alphapruning", "owl")
SCORES_HELP = ("scores.json (`layerif scores`), run.json or report/allocation.json (`layerif "
               "run`), alpha.json (`layerif alpha`), a .npy or a JSON list")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig(OverwriteArgs):
    scores: str | None = opt(None, SCORES_HELP, type=input_file("scores file"), shown="none")
    total: int = opt(REQUIRED, "T, experts in total", type=positive_int)
    beta: float = opt(2.5, "exponent of the power mapping", type=positive_float)
    aggregate: str = opt("+ve", "which aggregate to read from a scores file", choices=AGGREGATES)
    method: str = opt("layerif", "allocation", choices=EXPERT_METHODS)
    layers: int | None = opt(None, "number of layers (uniform / MoLA without --scores)",
                             type=positive_int, shown="from --scores")
    per_block: int = opt(7, "alphalora: PL_Alpha_Hill values per block in --scores "
                            "(7: one per matrix; 1: one per block)", type=positive_int)
    out: str | None = opt(None, "write the allocation as JSON", type=output_path,
                          shown="print only")

    def __post_init__(self):
        if self.method in ("layerif", "alphalora") and not self.scores:
            hint = (" (PL_Alpha_Hill per matrix: `layerif alpha --model M --out alpha.json`)"
                    if self.method == "alphalora" else " (a `layerif scores` scores.json)")
            raise LayerIFError(f"--method {self.method} needs --scores{hint}")
        if not self.scores and not self.layers:
            raise LayerIFError(f"--method {self.method} needs --layers or --scores (to know "
                               "the number of layers)")


def run_experts(cfg: ExpertsConfig, rt) -> None:
    import numpy as np

    from ..applications import allocation as al

    with out_file(cfg.out, "allocate experts", cfg.overwrite) as out:
        if cfg.method == "layerif":
            counts = al.expert_counts(al.read_metric(cfg.scores, "layer_scores", cfg.aggregate),
                                      cfg.total, cfg.beta)
        elif cfg.method == "alphalora":
            counts = al.alphalora_experts(al.read_metric(cfg.scores, "alpha"), cfg.total,
                                          cfg.beta, per_block=cfg.per_block)
        else:
            L = cfg.layers or len(al.read_metric(cfg.scores, "layer_scores", cfg.aggregate))
            counts = (al.uniform_experts(L, cfg.total) if cfg.method == "uniform"
                      else al.mola_experts(L, cfg.total, cfg.method.split(":", 1)[1]))
        counts = np.asarray(counts)
        print(" ".join(str(int(c)) for c in counts))
        if out is not None:
            out.write_json({"method": cfg.method, "total": cfg.total, "beta": cfg.beta,
                            "experts": counts, "top_k": al.top_k_per_layer(counts),
                            "scores": cfg.scores, "aggregate": cfg.aggregate})
            print(f"allocation -> {cfg.out}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig(OverwriteArgs):
    scores: str | None = opt(None, "layerif/reversed: LayerIF scores; alphapruning: "
                                   "PL_Alpha_Hill (else computed from --model); owl: outlier "
                                   "ratios per block. " + SCORES_HELP,
                             type=input_file("scores file"), shown="none")
    model: str | None = opt(None, "model whose matrix sizes weigh the sparsities (only its "
                                  "config is read, unless PL_Alpha_Hill must be computed)",
                            type=model_path, shown="SmolLM2-135M-Instruct, unless --config")
    config: str | None = opt(None, "or just the model's config.json", type=input_file("config"),
                             shown="none")
    sparsity: float = opt(REQUIRED, "global target sparsity in (0, 1)", type=fraction)
    epsilon: float = opt(0.1, "range of the linear map (METHOD.md 5)", type=unit_interval)
    allocation: str = opt("layerif", "allocation scheme", choices=SPARSITY_SCHEMES)
    aggregate: str = opt("+ve", "which aggregate to read from a scores file", choices=AGGREGATES)
    no_smooth: bool = opt(False, "no Savitzky-Golay smoothing")
    lam: float = opt(0.08, "OWL lambda", type=unit_interval)
    out: str | None = opt(None, "write the sparsities as JSON", type=output_path,
                          shown="print only")

    def __post_init__(self):
        if self.model and self.config:
            raise LayerIFError("give --model or --config, not both")
        if self.allocation in ("layerif", "reversed") and not self.scores:
            raise LayerIFError(f"--allocation {self.allocation} needs --scores (LayerIF "
                               "scores.json)")
        if self.allocation == "owl" and not self.scores:
            raise LayerIFError("--allocation owl needs --scores (outlier ratios per block; "
                               "`layerif prune --allocation owl` computes them)")


def model_config(source: str):
    """The ModelConfig of a model path without loading its weights."""
    from pathlib import Path

    from ..models.config import ModelConfig

    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        from ..formats import gguf_config
        return gguf_config(p)
    return ModelConfig.from_file(p / "config.json" if p.is_dir() else p)


def run_sparsity(cfg: SparsityConfig, rt) -> None:
    from ..applications import allocation as al
    from .common import ModelArgs

    with out_file(cfg.out, "allocate sparsity", cfg.overwrite) as out:
        source = cfg.config or ModelArgs(model=cfg.model).model_source()
        mcfg = model_config(source)
        kw = dict(param_counts=mcfg.param_counts(), target=cfg.sparsity, epsilon=cfg.epsilon,
                  smooth=not cfg.no_smooth, lam=cfg.lam)
        if cfg.allocation in ("layerif", "reversed"):
            kw["layer_scores"] = al.read_metric(cfg.scores, "layer_scores", cfg.aggregate)
        elif cfg.allocation == "alphapruning":
            if cfg.scores:
                kw["alpha"] = al.read_metric(cfg.scores, "alpha")
            else:
                if cfg.config:
                    raise LayerIFError("--allocation alphapruning without --scores computes "
                                       "PL_Alpha_Hill from the weights: give --model, not "
                                       "--config")
                from ..formats import load_model
                from ..applications.prune import alpha_per_matrix
                kw["alpha"] = alpha_per_matrix(load_model(source))
        elif cfg.allocation == "owl":
            kw["outlier_ratios"] = al.read_metric(cfg.scores, "outlier_ratios")
        ratios = al.layer_sparsities(cfg.allocation, **kw)
        per_block = ratios.reshape(mcfg.num_layers, -1).mean(1)
        print(" ".join(f"{x:.4f}" for x in per_block))
        if out is not None:
            out.write_json({"allocation": cfg.allocation, "target": cfg.sparsity,
                            "epsilon": cfg.epsilon, "scores": cfg.scores,
                            "per_matrix": dict(zip(mcfg.matrix_names(), ratios.tolist())),
                            "per_block_mean": per_block})
            print(f"sparsities -> {cfg.out}")


GROUP = Group("allocate", "experts per layer or sparsity per matrix from scores", (
    Command("experts", "LoRA-MoE experts per layer (METHOD.md section 4)", ExpertsConfig,
            run_experts),
    Command("sparsity", "per-matrix pruning sparsities (METHOD.md section 5)", SparsityConfig,
            run_sparsity),
))
