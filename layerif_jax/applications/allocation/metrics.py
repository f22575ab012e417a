"""Reading per-layer and per-matrix metrics from the files this package writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import LayerIFError

__all__ = ["METRICS", "read_metric"]

METRICS = ("layer_scores", "alpha", "outlier_ratios")


_ALPHA_HINT = ("compute them with `layerif alpha --model M --out alpha.json` (or "
               "layerif_jax.applications.prune.alpha_per_matrix)")


def read_metric(path, kind: str = "layer_scores", aggregate: str = "+ve") -> np.ndarray:
    """A per-layer or per-matrix metric from a file, as float64.

    Accepted: a `.npy`, a JSON list (or {name: value} object) of numbers, or a JSON
    object written by this package: `layerif scores` (scores.json: the `aggregate`
    from layer_scores_by_aggregate), `layerif run` (run.json, report/allocation.json:
    LayerIF scores and alpha_per_matrix), `layerif alpha` (alpha) or OWL outlier
    ratios (outlier_ratios). A file holding the wrong kind (LayerIF scores where
    PL_Alpha_Hill is needed, say) is refused with what it holds and how to get the
    right one.
    """
    if kind not in METRICS:
        raise LayerIFError(f"unknown metric {kind!r} (choose from {', '.join(METRICS)})")
    from ...io import read_json

    p = Path(path)
    if p.suffix == ".npy":
        try:
            values = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise LayerIFError(f"cannot read {p}: {e}") from None
        if values.dtype.kind not in "iuf":
            raise LayerIFError(f"{p}: expected numbers, got an array of {values.dtype}")
        return np.asarray(values, np.float64).reshape(-1)
    obj = read_json(p)
    values = obj
    if isinstance(obj, dict):
        values = _metric_of(obj, kind, aggregate, p)
    if isinstance(values, dict):
        values = list(values.values())
    if not isinstance(values, list) or not values:
        raise LayerIFError(f"{p}: expected a non-empty list of numbers for {kind}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LayerIFError(f"{p}: {kind} must be numbers; entry {i} is {v!r}")
    return np.asarray(values, np.float64)


def _metric_of(obj: dict, kind: str, aggregate: str, p: Path):
    has_scores = "layer_scores" in obj or "layer_scores_by_aggregate" in obj
    has_alpha = "alpha" in obj or "alpha_per_matrix" in obj
    if kind == "layer_scores":
        by = obj.get("layer_scores_by_aggregate") or {}
        if aggregate in by:
            return by[aggregate]
        if "layer_scores" in obj:
            if by:
                raise LayerIFError(f"{p} has no {aggregate!r} aggregate (it has "
                                   f"{', '.join(by)})")
            return obj["layer_scores"]
        if has_alpha:
            raise LayerIFError(f"{p} holds PL_Alpha_Hill values, not LayerIF layer scores "
                               "(`layerif scores` writes those)")
    elif kind == "alpha":
        for key in ("alpha", "alpha_per_matrix"):
            if key in obj:
                return obj[key]
        if has_scores:
            raise LayerIFError(f"{p} holds LayerIF layer scores, but PL_Alpha_Hill values "
                               f"(one per matrix) are needed here: {_ALPHA_HINT}")
    elif "outlier_ratios" in obj:
        return obj["outlier_ratios"]
    raise LayerIFError(f"{p}: no {kind} in it (keys: {', '.join(list(obj)[:8])})")
