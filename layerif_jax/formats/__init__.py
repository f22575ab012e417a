"""Checkpoint I/O: Hugging Face safetensors, GGUF, and the project's own orbax format.

`load_model(path, dtype)` accepts
  * a Hugging Face directory: `config.json` + `model.safetensors`, or sharded
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`;
  * a `.gguf` file (llama, qwen2, gemma architectures; every quantisation the
    `gguf` package dequantises);
  * a directory written by `save_checkpoint` / `convert`: `config.json` with
    `"layerif_jax_format": 1` plus an orbax save of the model's `nnx.State`
    (LoRA adapters included).

Tensors are read lazily (one stacked parameter staged on the host at a time) and
every writer builds its output in a temporary sibling directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .. import checksum
from . import safetensors as safetensors_io
from ..errors import LayerIFError
from ..io import OutputDir, parse_bytes, read_json, write_json
from .safetensors import SafetensorsFile
from ..models.config import SUPPORTED, ModelConfig
from ..models.decoder import Decoder
from ..models.lora import LoraConfig, apply_lora, lora_config_of
from ..models.params import hf_table, model_from_tensors

FORMAT_KEY = "layerif_jax_format"
FORMAT_VERSION = 1
STATE_DIR = "state"
ADAPTER_DIR = "adapter"
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"

_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


# ---------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------
def _dtype(dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' (also 'fp32', 'bf16', jnp/np dtypes) -> jnp dtype."""
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}
    if isinstance(dtype, str):
        dtype = aliases.get(dtype.lower(), dtype.lower())
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise LayerIFError(f"unsupported dtype {dtype!r} (use float32 or bfloat16)")
    return dt


def _np_dtype(dtype) -> np.dtype:
    dt = jnp.dtype(dtype)
    return np.dtype(ml_dtypes.bfloat16) if dt == jnp.bfloat16 else np.dtype(dt)


def _oneline(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0][:200] if msg else type(e).__name__


def _output_dir(out_dir, command: str, overwrite: bool) -> OutputDir:
    """`out_dir` as an `io.OutputDir` (an open one is used as it is): files of others in
    it are refused unless `overwrite`, and are never removed."""
    if isinstance(out_dir, OutputDir):
        return out_dir
    return OutputDir(Path(out_dir).expanduser().resolve(), command, overwrite=overwrite)


def _get_var(obj, path):
    for p in path:
        obj = getattr(obj, p)
    return obj


# ---------------------------------------------------------------------------------
# safetensors (lazy, bf16-capable)
# ---------------------------------------------------------------------------------
def _load_hf_dir(path: Path, dtype) -> Decoder:
    cfg = ModelConfig.from_file(path / "config.json")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    where: dict[str, Path] = {}
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LayerIFError(f"{index}: malformed index ({_oneline(e)})") from None
        files = sorted({path / v for v in wmap.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LayerIFError(f"{path}: shard files listed in the index are missing: "
                               + ", ".join(missing))
    elif single.is_file():
        files = [single]
    else:
        others = sorted(p.name for p in path.glob("*.safetensors"))
        if len(others) == 1:
            files = [path / others[0]]
        elif others:
            raise LayerIFError(f"{path}: several .safetensors files but no "
                               "model.safetensors.index.json")
        else:
            extra = (" (pytorch_model.bin is not supported: re-save with safetensors)"
                     if (path / "pytorch_model.bin").exists() else "")
            raise LayerIFError(f"{path}: no model.safetensors or sharded safetensors "
                               f"index{extra}")
    opened = {f: SafetensorsFile(f) for f in files}
    for f, st in opened.items():  # the files' own headers, not the index, say what is there
        for k in st.keys():
            where.setdefault(k, f)
    return model_from_tensors(cfg, list(where), lambda k: opened[where[k]].get(k),
                              dtype=dtype, source=str(path))


# ---------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------
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


def gguf_to_hf_name(name: str) -> str | None:
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


def gguf_config(path) -> ModelConfig:
    """The ModelConfig of a GGUF file (reads metadata only)."""
    reader = _gguf_reader(Path(path))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise LayerIFError(f"{path}: GGUF file has no token_embd.weight")
    return _gguf_config(reader, Path(path), names, tuple(int(x) for x in reversed(embd.shape)))


def _gguf_reader(path: Path):
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
                           f"{_oneline(e)}") from None


def _load_gguf(path: Path, dtype) -> Decoder:
    import gguf

    reader = _gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LayerIFError(f"{path}: GGUF file has no token_embd.weight")
    embd_shape = tuple(int(x) for x in reversed(tensors["token_embd.weight"].shape))
    cfg = _gguf_config(reader, path, set(tensors), embd_shape)
    arch = cfg.model_type

    by_hf: dict[str, Any] = {}
    for name, t in tensors.items():
        hf = gguf_to_hf_name(name)
        by_hf[hf if hf is not None else f"gguf:{name}"] = t

    def get(hf_name: str) -> np.ndarray:
        t = by_hf[hf_name]
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists dims innermost first
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise LayerIFError(f"{path}: cannot dequantise {t.name} "
                               f"({t.tensor_type.name}): {_oneline(e)}") from None
        w = np.asarray(w).reshape(shape)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads
            w = unpermute_rotary(w, n)
        if arch == "gemma" and hf_name.endswith("norm.weight"):
            w = w.astype(np.float32) - 1.0  # llama.cpp stores Gemma's (1 + w)
        return w

    return model_from_tensors(cfg, list(by_hf), get, dtype=dtype, source=str(path))


# ---------------------------------------------------------------------------------
# the project's own format
# ---------------------------------------------------------------------------------
def _lora_info(model: Decoder) -> dict[str, Any] | None:
    lins = {n: lin for n, lin in model.layers.linears().items() if lin.lora_a is not None}
    if not lins:
        return None
    first = next(iter(lins.values()))
    rank = int(first.lora_a.shape[-1])
    info = {"rank": rank, "alpha": float(first.lora_scale) * rank,
            "dropout": float(first.lora_dropout), "targets": list(lins),
            "dtype": str(jnp.dtype(first.lora_a[...].dtype))}
    lc = lora_config_of(model)
    if lc is not None and lc.rank == rank and set(lc.targets) == set(lins):
        info.update(alpha=float(lc.alpha), dropout=float(lc.dropout))  # the exact config
    return info


def _state_arrays(model) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def save_checkpoint(model: Decoder, out_dir, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (base weights and any LoRA adapters) to `out_dir`, committed as
    `io.OutputDir` does (files of others in `out_dir` are refused unless `overwrite`).

    Layout: `config.json` (the HF config plus `"layerif_jax_format": 1`, the base
    dtype, a `lora` section and the SHA-256 of every array, checked on load) and
    `state/` (orbax StandardCheckpointer save of the model's nnx.State). With
    `tokenizer`, its known files are saved next to config.json. Non-finite weights are
    refused.
    """
    import orbax.checkpoint as ocp

    from ..models.tokenizer import save_tokenizer_files

    meta = model.cfg.to_hf()
    meta[FORMAT_KEY] = FORMAT_VERSION
    meta["layerif_jax_dtype"] = str(jnp.dtype(model.dtype))
    lora = _lora_info(model)
    if lora is not None:
        meta["layerif_jax_lora"] = lora
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _state_arrays(model))
    bad = checksum.nonfinite(host)
    if bad is not None:
        raise LayerIFError(f"refusing to write {out_dir}: {bad} holds NaN or inf values")
    meta["layerif_jax_digests"] = checksum.tree_digests(host)
    del host
    state = nnx.state(model)
    out = _output_dir(out_dir, "convert", overwrite)
    with out, out.staging() as tmp:
        try:
            with ocp.StandardCheckpointer() as ck:
                ck.save(tmp / STATE_DIR, state)
                ck.wait_until_finished()
        except Exception as e:
            raise LayerIFError(f"cannot write checkpoint state to {out_dir}: "
                               f"{_oneline(e)}") from None
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        write_json(tmp / "config.json", meta)
    return out.path


def _load_own(path: Path, meta: dict[str, Any], dtype) -> Decoder:
    import orbax.checkpoint as ocp

    version = meta.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise LayerIFError(f"{path}: layerif_jax checkpoint format {version!r} is not "
                           f"supported by this version (expects {FORMAT_VERSION})")
    cfg = ModelConfig.from_hf(meta)
    lora = meta.get("layerif_jax_lora")
    if not (path / STATE_DIR).is_dir():
        raise LayerIFError(f"{path}: checkpoint has no {STATE_DIR}/ directory")

    lcfg = lora_dtype = None
    if lora:
        try:
            lcfg = LoraConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                              dropout=float(lora["dropout"]), targets=tuple(lora["targets"]))
            lora_dtype = _dtype(lora.get("dtype", "float32"))
        except (KeyError, TypeError, ValueError) as e:
            raise LayerIFError(f"{path}: malformed layerif_jax_lora section "
                               f"({type(e).__name__}: {_oneline(e)})") from None

    def build():
        m = Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if lcfg is not None:
            apply_lora(m, lcfg, dtype=lora_dtype)
        return m

    abstract = nnx.eval_shape(build)
    _, abs_state = nnx.split(abstract)
    # Without a sharding orbax restores host numpy arrays; ask for jax arrays on the
    # default device, as `model_from_tensors` makes.
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                             abs_state)
    try:
        with ocp.StandardCheckpointer() as ck:
            state = ck.restore(path / STATE_DIR, abs_state)
    except Exception as e:
        raise LayerIFError(f"cannot restore {path / STATE_DIR}: {_oneline(e)}") from None
    nnx.update(abstract, state)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _state_arrays(abstract))
    digests = meta.get("layerif_jax_digests")
    if digests and str(jnp.dtype(dtype)) == meta.get("layerif_jax_dtype"):
        bad = checksum.first_mismatch(host, digests)
        if bad is not None:
            raise LayerIFError(f"{path}: {bad} does not match its stored checksum (the "
                               "checkpoint is corrupt)")
    bad = checksum.nonfinite(host)
    if bad is not None:
        raise LayerIFError(f"{path}: {bad} holds NaN or inf values")
    return abstract


# ---------------------------------------------------------------------------------
# load_model / convert
# ---------------------------------------------------------------------------------
def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def load_model(path, dtype="float32") -> Decoder:
    """Load a Hugging Face safetensors directory, a .gguf file or a project checkpoint."""
    dt = _dtype(dtype)
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerIFError(f"checkpoint not found: {p}")
    if not os.access(p, os.R_OK):
        raise LayerIFError(f"checkpoint not readable: {p}")
    if p.is_file():
        if _is_gguf(p):
            return _load_gguf(p, dt)
        if p.name == "config.json":
            return load_model(p.parent, dt)
        raise LayerIFError(f"{p}: unknown checkpoint format (expected a .gguf file or a "
                           "directory with config.json)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (did you mean {ggufs[0]}?)" if len(ggufs) == 1 else ""
        raise LayerIFError(f"{p}: unknown checkpoint format: no config.json{hint}")
    meta = read_json(cfg_path)
    if not isinstance(meta, dict):
        raise LayerIFError(f"{cfg_path}: expected a JSON object")
    from ..models.tokenizer import refuse_remote_code
    refuse_remote_code(p)
    if FORMAT_KEY in meta:
        return _load_own(p, meta, dt)
    if meta.get("model_type") not in SUPPORTED:
        raise LayerIFError(f"{p}: unsupported architecture {meta.get('model_type')!r} "
                           f"(supported: {', '.join(SUPPORTED)})")
    return _load_hf_dir(p, dt)


def _has_tokenizer_files(p: Path) -> bool:
    if p.is_file():
        return True  # GGUF carries its tokenizer
    return any((p / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                          "tokenizer.model", "vocab.json"))


def convert(src, out_dir, dtype="float32", *, overwrite: bool = False) -> Path:
    """`load_model(src)` + `save_checkpoint`, with the source's tokenizer stored alongside."""
    from ..models.tokenizer import load_tokenizer

    model = load_model(src, dtype)
    tok = None
    if _has_tokenizer_files(Path(src).expanduser()):
        tok = load_tokenizer(src)
    else:
        warnings.warn(f"{src} has no tokenizer files; the output will hold the model only",
                      stacklevel=2)
    return save_checkpoint(model, out_dir, tokenizer=tok, overwrite=overwrite)


# ---------------------------------------------------------------------------------
# Hugging Face export
# ---------------------------------------------------------------------------------
def _merged_kernel(lin) -> jax.Array:
    """`lin.kernel + scale A B`, computed exactly as `lora.merge_lora` does (no mutation)."""
    w = lin.kernel[...]
    delta = lin.lora_scale * jnp.einsum(
        "lir,lro->lio", lin.lora_a[...].astype(jnp.float32), lin.lora_b[...].astype(jnp.float32))
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def _hf_tensors(model: Decoder, dtype, merge: bool) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors, one stacked parameter fetched from the device at a time."""
    cfg = model.cfg
    npdt = None if dtype is None else _np_dtype(dtype)
    for pattern, path, per_layer, transpose in hf_table(cfg):
        owner = _get_var(model, path[:-1]) if len(path) > 1 else None
        if (merge and path[-1] == "kernel" and owner is not None
                and getattr(owner, "lora_a", None) is not None):
            arr = _merged_kernel(owner)
        else:
            arr = _get_var(model, path)[...]
        arr = np.asarray(jax.device_get(arr))
        if npdt is not None:
            arr = arr.astype(npdt)
        for l in (range(cfg.num_layers) if per_layer else [None]):
            t = arr[l] if per_layer else arr
            yield pattern.format(l=l), np.ascontiguousarray(t.T if transpose else t)


def _write_safetensors(tmp: Path, tensors: Iterator[tuple[str, np.ndarray]],
                       max_bytes: int, stem: str = "model") -> None:
    """Write shards of at most `max_bytes` (a single larger tensor gets its own shard);
    every tensor finite (`safetensors_io.write`), with its checksum."""
    written: list[tuple[Path, list[str]]] = []
    buf: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal buf, size
        if buf:
            f = tmp / f".{stem}-part{len(written):05d}.safetensors"
            safetensors_io.write(f, buf)
            written.append((f, list(buf)))
        buf, size = {}, 0

    for name, t in tensors:
        if buf and size + t.nbytes > max_bytes:
            flush()
        buf[name] = t
        size += t.nbytes
        total += t.nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(tmp / f"{stem}.safetensors")
        return
    n = len(written)
    wmap = {}
    for i, (f, names) in enumerate(written):
        final = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(tmp / final)
        wmap.update({k: final for k in names})
    write_json(tmp / f"{stem}.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})


def export_hf(model: Decoder, out_dir, dtype=None, merge_lora: bool = True, *,
              tokenizer=None, max_shard_size=DEFAULT_SHARD_BYTES,
              overwrite: bool = False, extra_json: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face checkpoint directory transformers can load.

    `config.json` + `model.safetensors` (sharded with an index above `max_shard_size`).
    LoRA adapters are folded into the kernels when `merge_lora` (the model itself is
    not modified); otherwise the base weights are written and the adapters go to
    `out_dir/adapter/` (`adapter_config.json` + `adapter_model.safetensors`, PEFT's
    layout: `PeftModel.from_pretrained(base, out_dir / "adapter")`). A subdirectory,
    because transformers silently applies an adapter found next to the base weights.
    `dtype=None` keeps the model's dtype. The tokenizer's files are written when given.
    `extra_json`: more files ({name: object}) committed with the checkpoint.
    """
    dt = None if dtype is None else _dtype(dtype)
    max_bytes = parse_bytes(max_shard_size, "shard size")
    lora = _lora_info(model)
    hf_cfg = model.cfg.to_hf()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(jnp.dtype(dt or model.dtype))
    from ..models.tokenizer import save_tokenizer_files

    out = _output_dir(out_dir, "export", overwrite)
    with out, out.staging() as tmp:
        _write_safetensors(tmp, _hf_tensors(model, dt, merge=merge_lora), max_bytes)
        if lora is not None and not merge_lora:
            from .peft import save_peft_adapter
            save_peft_adapter(model, tmp / ADAPTER_DIR)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)
        write_json(tmp / "config.json", hf_cfg)
    return out.path
