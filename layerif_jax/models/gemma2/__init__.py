"""Gemma 2: RMSNorms (1 + w) before AND after both the attention and the MLP, attention
scaled by query_pre_attn_scalar^-1/2 with logit soft-capping (cap * tanh(s / cap)),
sliding-window attention on alternating layers, soft-capped final logits."""

from __future__ import annotations

from ..decoder import apply_rope, attention, glu, rms_norm
from ..families import Family, register
from ..gemma import gelu


def block(cfg, p, x_BTD, bias, pos_BT, inv_freq, lins, dtype):
    B, T, _ = x_BTD.shape
    H, K, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    norm = lambda x, name: rms_norm(x, p[name], eps, 1.0)
    h = norm(x_BTD, "input_layernorm")
    q, k, v = lins(("q_proj", "k_proj", "v_proj"), h)
    q = apply_rope(q.reshape(B, T, H, hd), pos_BT, inv_freq)
    k = apply_rope(k.reshape(B, T, K, hd), pos_BT, inv_freq)
    o = attention(q, k, v.reshape(B, T, K, hd), bias, dtype, scale=cfg.attn_scale,
                  softcap=cfg.attn_logit_softcap)
    x_BTD = x_BTD + norm(lins(("o_proj",), o)[0], "post_attention_layernorm")
    g, u = lins(("gate_proj", "up_proj"), norm(x_BTD, "pre_feedforward_layernorm"))
    return x_BTD + norm(lins(("down_proj",), glu(cfg.hidden_act, g, u))[0],
                        "post_feedforward_layernorm")


def from_hf(c: dict, model_type: str) -> dict:
    L = int(c["num_hidden_layers"])
    types = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(L)]
    return {"hidden_act": gelu(c), "tie_word_embeddings": bool(c.get("tie_word_embeddings", True)),
            "layer_types": tuple(types),
            "query_pre_attn_scalar": float(c.get("query_pre_attn_scalar", 256)),
            "attn_logit_softcap": c.get("attn_logit_softcapping"),
            "final_logit_softcap": c.get("final_logit_softcapping")}


def to_hf(cfg) -> dict:
    return {"hidden_activation": cfg.hidden_act, "attention_bias": cfg.o_bias,
            "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap}


FAMILY = register(Family(
    name="gemma2", model_types=("gemma2",), architectures={"gemma2": "Gemma2ForCausalLM"},
    block=block, from_hf=from_hf, to_hf=to_hf,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm"),
    norm_offset=1.0, scale_embeddings=True))
