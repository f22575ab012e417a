"""Model configuration: one frozen dataclass for every decoder family we run.

Built from a Hugging Face `config.json` (transformers 4.x `rope_theta`/`rope_scaling`
or 5.x `rope_parameters`) or from GGUF metadata; written back as a `config.json`
that transformers loads. The fields every family shares are read here; each family
(`models/<family>/`) reads its own (`Family.from_hf`) and writes them back.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..errors import LayerIFError

# The prunable / LoRA-targetable linear maps of a block, in model order.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    # per-layer attention ("sliding_attention" | "full_attention"); None: every layer
    # uses `sliding_window` (None = full)
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None   # attention scale 1/sqrt(this) (Gemma 2)
    attn_logit_softcap: float | None = None      # cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None     # the same on the logits (Gemma 2)

    @property
    def family(self):
        from .families import family_of
        return family_of(self.model_type)

    # -- family constants -------------------------------------------------------------
    @property
    def norm_offset(self) -> float:
        """Gemma's RMSNorm multiplies by (1 + w)."""
        return self.family.norm_offset

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies embeddings by sqrt(hidden_size)."""
        return math.sqrt(self.hidden_size) if self.family.scale_embeddings else None

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full causal attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(d_in, d_out) of one of the block's linear maps."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }[name]

    def has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        if name == "o_proj":
            return self.o_bias
        return self.mlp_bias

    def matrix_names(self) -> list[str]:
        """The prunable matrices in model order: layers.{l}.self_attn.q_proj ...
        layers.{l}.mlp.down_proj (the names of every per-matrix output)."""
        return [f"layers.{l}.{'self_attn' if n in _ATTN else 'mlp'}.{n}"
                for l in range(self.num_layers) for n in LINEARS]

    def param_counts(self) -> list[int]:
        """Weight-matrix sizes in model order (block 0 q..down, block 1, ...)."""
        one = [math.prod(self.linear_shape(n)) for n in LINEARS]
        return one * self.num_layers

    # -- Hugging Face config.json ---------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        from .families import family_of

        mt = cfg.get("model_type")
        family = family_of(mt)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = cfg.get("rope_parameters") or {}
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling") or {
                k: v for k, v in rope.items() if k != "rope_theta"}
            rtype = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
            if rtype not in ("default", "linear", "llama3"):
                raise LayerIFError(f"unsupported rope scaling type {rtype!r}")
            scaling_t = None if rtype == "default" else tuple(sorted(
                (k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
            if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
                raise LayerIFError(f"unsupported activation {act!r}")
            window = cfg.get("sliding_window")
            attn_bias = bool(cfg.get("attention_bias", False))
            fields = dict(
                model_type=mt,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling_t,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=attn_bias, o_bias=attn_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                hidden_act=act,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
            )
            fields.update(family.from_hf(cfg, mt))
            return cls(**fields)
        except KeyError as e:
            raise LayerIFError(f"config.json lacks required key {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        from ..io import read_json
        return cls.from_hf(read_json(path))

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": [self.family.architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        out.update(self.family.to_hf(self))
        return out


def __getattr__(name):
    if name == "SUPPORTED":  # the model types of the registered families
        from .families import supported
        return supported()
    raise AttributeError(name)
