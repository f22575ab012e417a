"""layerif_jax: LayerIF (layer-wise influence-function quality scores for LLMs) in JAX/Flax NNX.

Public API (see README):
    load_model(path, dtype="float32")      HF dir / .gguf / converted checkpoint -> NNX Decoder
    load_tokenizer(path)                   tokenizer with encode/decode (GGUF too)
    LoraConfig, apply_lora, merge_lora     LoRA typed nnx.LoRAParam
    influence_scores(loss_fn, params, train, val, layer_of=...)   influence on any JAX model
    layer_scores(model, train, val, ...)   per-layer influence and LayerIF scores S^(l)
    write_scores(res, out_dir)             scores.json, per_example.npy, scores.png
    allocate                                experts per layer, sparsity per matrix

Names are imported on first use, so `import layerif_jax` (and `layerif --help`) does
not wait for jax.
"""

from __future__ import annotations

import importlib

from .errors import EstimatorsFailed, LayerIFError

__version__ = "0.1.0"

_EXPORTS = {
    "allocate": ".applications.allocation", "data": ".data", "influence": ".influence",
    "Example": ".data", "load_records": ".data", "tokenize": ".data",
    "LayerScores": ".influence", "layer_scores": ".influence",
    "influence_scores": ".influence", "OutputLoss": ".influence", "sample_label": ".influence",
    "write_scores": ".influence.output",
    "convert": ".formats", "export_hf": ".formats",
    "load_model": ".formats", "save_checkpoint": ".formats",
    "ModelConfig": ".models.config", "Decoder": ".models.decoder",
    "LoraConfig": ".models.lora", "apply_lora": ".models.lora", "merge_lora": ".models.lora",
    "load_tokenizer": ".models.tokenizer",
}

_MODULES = {"allocate", "data", "influence"}  # names that are modules themselves

__all__ = ["EstimatorsFailed", "LayerIFError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'layerif_jax' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
