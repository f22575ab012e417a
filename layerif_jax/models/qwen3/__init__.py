"""Qwen3: the Llama block with an RMSNorm over each head of q and of k (before RoPE),
no biases by default, and an explicit head_dim."""

from __future__ import annotations

from ..decoder import apply_rope, attention, glu, rms_norm
from ..families import Family, register


def block(cfg, p, x_BTD, bias, pos_BT, inv_freq, lins, dtype):
    B, T, _ = x_BTD.shape
    H, K, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    h = rms_norm(x_BTD, p["input_layernorm"], eps, 0.0)
    q, k, v = lins(("q_proj", "k_proj", "v_proj"), h)
    q = apply_rope(rms_norm(q.reshape(B, T, H, hd), p["q_norm"], eps, 0.0), pos_BT, inv_freq)
    k = apply_rope(rms_norm(k.reshape(B, T, K, hd), p["k_norm"], eps, 0.0), pos_BT, inv_freq)
    o = attention(q, k, v.reshape(B, T, K, hd), bias, dtype, scale=cfg.attn_scale)
    x_BTD = x_BTD + lins(("o_proj",), o)[0]
    h = rms_norm(x_BTD, p["post_attention_layernorm"], eps, 0.0)
    g, u = lins(("gate_proj", "up_proj"), h)
    return x_BTD + lins(("down_proj",), glu(cfg.hidden_act, g, u))[0]


def from_hf(c: dict, model_type: str) -> dict:
    window = int(c["sliding_window"]) if c.get("use_sliding_window") and c.get("sliding_window") else None
    types = c.get("layer_types")
    if window is None or not types:
        types = None
    return {"sliding_window": window, "layer_types": tuple(types) if types else None}


def to_hf(cfg) -> dict:
    L = cfg.num_layers
    types = cfg.layer_types or ("full_attention",) * L
    return {"attention_bias": cfg.o_bias, "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window, "layer_types": list(types),
            "max_window_layers": next((i for i, t in enumerate(types)
                                       if t == "sliding_attention"), L)}


FAMILY = register(Family(
    name="qwen3", model_types=("qwen3",), architectures={"qwen3": "Qwen3ForCausalLM"},
    block=block, from_hf=from_hf, to_hf=to_hf, head_norms=("q_norm", "k_norm")))
