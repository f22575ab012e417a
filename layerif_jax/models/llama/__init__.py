"""Llama, Mistral and Qwen2: pre-norm grouped-query attention with RoPE, and a gated MLP.

The block here is the standard one; Gemma (1) reuses it with its own norms and
activation. Qwen2 has biases on q, k and v (none on o) and, by default, no sliding
window; Mistral may have one on every layer.
"""

from __future__ import annotations

from ..decoder import apply_rope, attention, glu, rms_norm
from ..families import Family, register


def block(cfg, p, x_BTD, bias, pos_BT, inv_freq, lins, dtype):
    """Attention + MLP of one block; `lins(names, h)` applies the linear maps `names`
    that share the input h (see `decoder.GROUPS`)."""
    B, T, _ = x_BTD.shape
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = rms_norm(x_BTD, p["input_layernorm"], cfg.rms_norm_eps, cfg.norm_offset)
    q, k, v = lins(("q_proj", "k_proj", "v_proj"), h)
    q = apply_rope(q.reshape(B, T, H, hd), pos_BT, inv_freq)
    k = apply_rope(k.reshape(B, T, K, hd), pos_BT, inv_freq)
    o = attention(q, k, v.reshape(B, T, K, hd), bias, dtype, scale=cfg.attn_scale)
    x_BTD = x_BTD + lins(("o_proj",), o)[0]
    h = rms_norm(x_BTD, p["post_attention_layernorm"], cfg.rms_norm_eps, cfg.norm_offset)
    g, u = lins(("gate_proj", "up_proj"), h)
    return x_BTD + lins(("down_proj",), glu(cfg.hidden_act, g, u))[0]


def from_hf(c: dict, model_type: str) -> dict:
    if model_type == "qwen2":
        return {"qkv_bias": True, "o_bias": False,
                "sliding_window": (int(c["sliding_window"]) if c.get("use_sliding_window")
                                   and c.get("sliding_window") else None)}
    return {}


def to_hf(cfg) -> dict:
    if cfg.model_type == "qwen2":
        return {"use_sliding_window": cfg.sliding_window is not None,
                "sliding_window": cfg.sliding_window, "max_window_layers": cfg.num_layers}
    out = {"attention_bias": cfg.o_bias}
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


FAMILY = register(Family(
    name="llama", model_types=("llama", "mistral", "qwen2"),
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM"},
    block=block, from_hf=from_hf, to_hf=to_hf))
