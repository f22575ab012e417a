"""`layerif alpha`: PL_Alpha_Hill of every prunable matrix (AlphaLoRA, AlphaPruning)."""

from __future__ import annotations

import dataclasses

from .common import Command, ModelArgs, OverwriteArgs, load_model_checked, out_file
from .options import opt, output_path


@dataclasses.dataclass(frozen=True)
class AlphaConfig(OverwriteArgs, ModelArgs):
    xmin: str = opt("peak", "cut-off candidates of the Hill estimator (AlphaPruning's "
                            "xmin_peak, xmin_mid, or every eigenvalue)",
                    choices=("peak", "mid", "all"))
    out: str | None = opt(None, "write {alpha: {matrix: value}, per_block_mean} as JSON "
                                "(for --method alphalora / --allocation alphapruning)",
                          type=output_path, shown="print only")


def run(cfg: AlphaConfig, rt) -> None:
    from ..applications.prune import alpha_per_matrix

    with out_file(cfg.out, "alpha", cfg.overwrite) as out:
        source = cfg.model_source()
        model = load_model_checked(source, cfg.dtype)
        alpha = alpha_per_matrix(model, xmin=cfg.xmin)
        per_block = alpha.reshape(model.cfg.num_layers, -1).mean(1)
        print(" ".join(f"{x:.3f}" for x in per_block))
        if out:
            out.write_json({"model": source, "xmin": cfg.xmin,
                            "alpha": dict(zip(model.cfg.matrix_names(), alpha.tolist())),
                            "per_block_mean": per_block})
            print(f"PL_Alpha_Hill -> {cfg.out}")


COMMAND = Command("alpha", "PL_Alpha_Hill of every prunable matrix (for AlphaLoRA and "
                           "AlphaPruning)", AlphaConfig, run)
