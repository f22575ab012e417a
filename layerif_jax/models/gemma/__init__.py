"""Gemma (1): the Llama block with RMSNorm scaled by (1 + w), embeddings scaled by
sqrt(hidden size), the tanh-approximated GELU, and tied embeddings by default."""

from __future__ import annotations

from ..families import Family, register
from ..llama import block


def gelu(c: dict) -> str:
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    # transformers' Gemma forces the tanh approximation of the exact GELU
    return "gelu_pytorch_tanh" if act in ("gelu", "gelu_pytorch_tanh") else act


def from_hf(c: dict, model_type: str) -> dict:
    return {"hidden_act": gelu(c), "tie_word_embeddings": bool(c.get("tie_word_embeddings", True))}


def to_hf(cfg) -> dict:
    return {"hidden_activation": cfg.hidden_act, "attention_bias": cfg.o_bias}


FAMILY = register(Family(
    name="gemma", model_types=("gemma",), architectures={"gemma": "GemmaForCausalLM"},
    block=block, from_hf=from_hf, to_hf=to_hf, norm_offset=1.0, scale_embeddings=True))
