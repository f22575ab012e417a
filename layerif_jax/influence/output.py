"""The files of a LayerIF scores run, written the same way by the CLI and by API users.

`write_scores(res, out)` commits into `out` (see `layerif_jax.io.OutputDir`):

- `scores.json`: the layer scores (every aggregate), what they mean, the settings and
  the run's meta (memory, chunks, timings);
- `per_example.npy` [n, L]; with `per_val` also `per_val.npy` [n, m] and
  `per_val_layers.npy` [n, m, L];
- `scores.png`: the layer scores as bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import OutputDir, write_json, write_npy
from .aggregate import AGGREGATES
from .driver import LayerScores

MEANING = {
    "per_example": (
        "per_example.npy [n, L]: score[i, l] = v_l . (G_l + lambda_l I)^-1 g_i,l per layer "
        "(DataInf approximates the inverse per unit; identity uses none); positive = "
        "up-weighting training example i lowers the validation loss (beneficial)"),
    "layer_scores": (
        "S_l, one per layer (decoder block): '+ve' sums the positive scores of the layer, "
        "'top25' the largest quarter of them, 'all' every score; a HIGH S means the "
        "layer is sensitive to its training data (less well trained): LayerIF gives it "
        "more experts and more sparsity"),
    "scale": (
        "raw inverse-Hessian-vector products (loss^2 over the damping's scale): compare "
        "layers within one run; magnitudes change with the model, data size and damping"),
}


def summary(res: LayerScores, **info: Any) -> dict[str, Any]:
    """The scores.json object of `res`; `info` adds the caller's settings (paths...)."""
    positive = bool((res.per_example > 0).all())
    return {
        "layer_scores": res.layer_scores, "aggregate": res.aggregate,
        "layer_scores_by_aggregate": {k: res.aggregated(k) for k in AGGREGATES},
        "meaning": MEANING,
        "all_scores_positive": positive,
        "estimator": res.estimator, "unit": res.unit, "n_train": res.n_train,
        "n_val": res.n_val, "seconds": round(res.seconds, 3),
        "gradients_kept": res.gradients_kept, **info, **res.meta,
    }


def plot_scores(scores, path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(scores)), scores, color="tab:blue")
    ax.set_xlabel("layer (decoder block)")
    ax.set_ylabel("S (higher = less well trained)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_scores(res: LayerScores, out, *, overwrite: bool = False, plot: bool = True,
                 title: str = "", **info: Any) -> Path:
    """Write the run's files into `out` (a path or an open `OutputDir`). Returns the dir."""
    od = out if isinstance(out, OutputDir) else OutputDir(out, "scores", overwrite=overwrite)
    with od, od.staging() as tmp:
        write_json(tmp / "scores.json", summary(res, **info))
        write_npy(tmp / "per_example.npy", res.per_example)
        if res.per_val_layers is not None:
            write_npy(tmp / "per_val.npy", res.per_val)
            write_npy(tmp / "per_val_layers.npy", res.per_val_layers)
        if plot:
            plot_scores(np.asarray(res.layer_scores), tmp / "scores.png",
                        title=title or f"LayerIF ({res.estimator}, {res.aggregate})")
    return od.path
