"""Hugging Face checkpoint directories: the reader (config.json + safetensors, sharded
too) and the writer (`export_hf`: what transformers loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .. import dtypes
from ..errors import LayerIFError
from ..io import parse_bytes, write_json
from ..models.config import ModelConfig
from ..models.decoder import Decoder
from ..models.lora import merged_kernel
from ..models.params import get_var, hf_table, model_from_tensors, sharded_model_from_tensors
from . import safetensors as safetensors_io
from .common import lora_info, oneline, output_dir

ADAPTER_DIR = "adapter"
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"


def read(path: Path, dtype, mesh=None, sharding: str = "fsdp") -> Decoder:
    """A Hugging Face directory -> Decoder (tensors read one at a time). With a mesh,
    straight into the shards of `sharding` (`layerif_jax.sharding`): each process reads
    only the slices its devices hold."""
    cfg = ModelConfig.from_file(path / "config.json")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    where: dict[str, Path] = {}
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LayerIFError(f"{index}: malformed index ({oneline(e)})") from None
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
    opened = {f: safetensors_io.SafetensorsFile(f) for f in files}
    for f, st in opened.items():  # the files' own headers, not the index, say what is there
        for k in st.keys():
            where.setdefault(k, f)
    if mesh is not None:
        return sharded_model_from_tensors(
            cfg, list(where), lambda k: opened[where[k]].shape(k),
            lambda k, idx: opened[where[k]].get_slice(k, idx), mesh=mesh, sharding=sharding,
            dtype=dtype, source=str(path))
    return model_from_tensors(cfg, list(where), lambda k: opened[where[k]].get(k),
                              dtype=dtype, source=str(path))




def _hf_tensors(model: Decoder, dtype, merge: bool) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors, one stacked parameter fetched from the device at a time."""
    cfg = model.cfg
    npdt = None if dtype is None else dtypes.numpy_dtype(dtype)
    for pattern, path, per_layer, transpose in hf_table(cfg):
        owner = get_var(model, path[:-1]) if len(path) > 1 else None
        if (merge and path[-1] == "kernel" and owner is not None
                and getattr(owner, "lora_a", None) is not None):
            arr = merged_kernel(owner)
        else:
            arr = get_var(model, path)[...]
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


def export(model: Decoder, out_dir, dtype=None, merge_lora: bool = True, *,
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
    dt = None if dtype is None else dtypes.jnp_dtype(dtype)
    max_bytes = parse_bytes(max_shard_size, "shard size")
    lora = lora_info(model)
    hf_cfg = model.cfg.to_hf()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(jnp.dtype(dt or model.dtype))
    from ..models.tokenizer import save_tokenizer_files

    out = output_dir(out_dir, "export", overwrite)
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
