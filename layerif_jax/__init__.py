"""layerif_jax: LayerIF (layer-wise influence-function quality scores for LLMs) in JAX/Flax NNX.

Public API (see README):
    load_model(path, dtype="float32")      HF dir / .gguf / converted checkpoint -> NNX Decoder
    load_tokenizer(path)                   tokenizer with encode/decode (GGUF too)
    LoraConfig, apply_lora, merge_lora     LoRA typed nnx.LoRAParam
    layer_scores(model, train, val, ...)   per-layer influence and LayerIF scores S^(l)
    allocate                                experts per layer, sparsity per matrix
"""

from . import allocate, data, influence
from .data import Example, load_records, tokenize
from .errors import LayerIFError
from .influence import LayerScores, layer_scores
from .model.checkpoints import convert, export_hf, load_model, save_checkpoint
from .model.config import ModelConfig
from .model.decoder import Decoder
from .model.lora import LoraConfig, apply_lora, merge_lora
from .model.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["allocate", "data", "influence", "Example", "load_records", "tokenize",
           "LayerIFError", "LayerScores", "layer_scores", "convert", "export_hf", "load_model",
           "save_checkpoint", "ModelConfig", "Decoder", "LoraConfig", "apply_lora", "merge_lora",
           "load_tokenizer", "__version__"]
