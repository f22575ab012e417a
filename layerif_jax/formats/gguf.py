"""GGUF files (llama.cpp): the reader. Tensors are dequantised one at a time by the
`gguf` package; llama's q/k row permutation is undone; every tensor's byte range is
checked against the file first (a truncated file is named with the tensor)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LayerIFError
from ..models.config import ModelConfig
from ..models.decoder import Decoder
from ..models.params import model_from_tensors
from .common import oneline

GGUF_ARCHS = ("llama", "qwen2", "gemma")

_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_BLK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def to_hf_name(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (None when there is no counterpart)."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_BLK_RE.fullmatch(name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its interleaved rotary order -> HF rotate-half).

    llama.cpp's convert script does `w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`;
    the inverse views the rows as (n_head, hd/2, 2) and swaps the last two axes back.
    """
    hd2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, hd2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF order); the inverse of `unpermute_rotary`."""
    hd2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, hd2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def _gguf_config(reader, path: Path, tensor_names: set[str], embd_shape) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise LayerIFError(f"{path}: unsupported GGUF architecture {arch!r} "
                           f"(supported: {', '.join(GGUF_ARCHS)})")

    def need(key):
        v = _gguf_field(reader, f"{arch}.{key}")
        if v is None:
            raise LayerIFError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    if "rope_freqs.weight" in tensor_names:
        raise LayerIFError(f"{path}: per-dimension rope frequency factors (rope_freqs.weight, "
                           "Llama-3.1-style scaling) are not supported from GGUF; "
                           "load the Hugging Face checkpoint instead")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = _gguf_field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):
        if len(set(kv)) != 1:
            raise LayerIFError(f"{path}: per-layer KV head counts are not supported")
        kv = kv[0]
    head_dim = (_gguf_field(reader, f"{arch}.attention.key_length")
                or _gguf_field(reader, f"{arch}.rope.dimension_count")
                or hidden // heads)
    scaling = None
    stype = _gguf_field(reader, f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        factor = _gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0)
        if stype != "linear":
            raise LayerIFError(f"{path}: unsupported GGUF rope scaling type {stype!r}")
        scaling = (("factor", float(factor)), ("rope_type", "linear"))
    window = _gguf_field(reader, f"{arch}.attention.sliding_window")
    if arch == "qwen2":
        window = None  # llama.cpp's qwen2 uses full attention
    eps = _gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    return ModelConfig(
        model_type=arch,
        vocab_size=int(embd_shape[0]),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(eps),
        rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_gguf_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        sliding_window=int(window) if window else None,
        hidden_act="gelu_pytorch_tanh" if arch == "gemma" else "silu",
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def config(path) -> ModelConfig:
    """The ModelConfig of a GGUF file (reads metadata only)."""
    reader = open_reader(Path(path))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise LayerIFError(f"{path}: GGUF file has no token_embd.weight")
    return _gguf_config(reader, Path(path), names, tuple(int(x) for x in reversed(embd.shape)))


def open_reader(path: Path):
    import gguf

    class Checked(gguf.GGUFReader):
        """Checks every tensor's byte range against the file before mapping it."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for f in fields:
                try:
                    _, name, _, dims, raw, off = f.parts
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw[0])]
                    need = int(np.prod(dims)) * type_size // block
                    end = int(start_offs + off[0]) + need
                except Exception:  # noqa: BLE001 - an unknown layout: let gguf decide
                    continue
                if end > size:
                    raise LayerIFError(
                        f"truncated or corrupt GGUF {path}: expected {need} bytes for tensor "
                        f"{bytes(name).decode(errors='replace')} (up to byte {end}), the file "
                        f"has {size}")
            super()._build_tensors(start_offs, fields)

    try:
        return Checked(str(path))
    except LayerIFError:
        raise
    except Exception as e:
        raise LayerIFError(f"cannot read GGUF file {path} (truncated or corrupt?): "
                           f"{oneline(e)}") from None


def read(path: Path, dtype) -> Decoder:
    import gguf

    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LayerIFError(f"{path}: GGUF file has no token_embd.weight")
    embd_shape = tuple(int(x) for x in reversed(tensors["token_embd.weight"].shape))
    cfg = _gguf_config(reader, path, set(tensors), embd_shape)
    arch = cfg.model_type

    by_hf: dict[str, Any] = {}
    for name, t in tensors.items():
        hf = to_hf_name(name)
        by_hf[hf if hf is not None else f"gguf:{name}"] = t

    def get(hf_name: str) -> np.ndarray:
        t = by_hf[hf_name]
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists dims innermost first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LayerIFError(f"{path}: cannot dequantise {t.name} "
                               f"({t.tensor_type.name}): {oneline(e)}") from None
        w = np.asarray(w).reshape(shape)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads
            w = unpermute_rotary(w, n)
        if arch == "gemma" and hf_name.endswith("norm.weight"):
            w = w.astype(np.float32) - 1.0  # llama.cpp stores Gemma's (1 + w)
        return w

    return model_from_tensors(cfg, list(by_hf), get, dtype=dtype, source=str(path))


