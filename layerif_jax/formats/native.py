"""The project's own checkpoint format: `config.json` (the HF config plus
`"layerif_jax_format": 1`, the dtype, the LoRA section and the SHA-256 of every array)
and `state/` (an orbax save of the model's nnx.State, LoRA included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checksum, dtypes
from ..errors import LayerIFError
from ..io import write_json
from ..models.config import ModelConfig
from ..models.decoder import Decoder
from ..models.lora import LoraConfig, apply_lora
from .common import lora_info, oneline, output_dir

FORMAT_KEY = "layerif_jax_format"
FORMAT_VERSION = 1
STATE_DIR = "state"


def _state_arrays(model) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def save(model: Decoder, out_dir, *, tokenizer=None, overwrite: bool = False) -> Path:
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
    lora = lora_info(model)
    if lora is not None:
        meta["layerif_jax_lora"] = lora
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _state_arrays(model))
    bad = checksum.nonfinite(host)
    if bad is not None:
        raise LayerIFError(f"refusing to write {out_dir}: {bad} holds NaN or inf values")
    meta["layerif_jax_digests"] = checksum.tree_digests(host)
    del host
    state = nnx.state(model)
    out = output_dir(out_dir, "convert", overwrite)
    with out, out.staging() as tmp:
        try:
            with ocp.StandardCheckpointer() as ck:
                ck.save(tmp / STATE_DIR, state)
                ck.wait_until_finished()
        except Exception as e:
            raise LayerIFError(f"cannot write checkpoint state to {out_dir}: "
                               f"{oneline(e)}") from None
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        write_json(tmp / "config.json", meta)
    return out.path


def read(path: Path, meta: dict[str, Any], dtype, mesh=None, sharding: str = "fsdp") -> Decoder:
    """A directory written by `save` -> Decoder (arrays checked against their checksums).
    With a ("data", "model") mesh, orbax restores every array straight into the shards of
    the `sharding` preset (`layerif_jax.sharding`): each device gets only its slice, read
    from the chunks of the saved array that overlap it."""
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
            lora_dtype = dtypes.jnp_dtype(lora.get("dtype", "float32"))
        except (KeyError, TypeError, ValueError) as e:
            raise LayerIFError(f"{path}: malformed layerif_jax_lora section "
                               f"({type(e).__name__}: {oneline(e)})") from None

    def build():
        m = Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if lcfg is not None:
            apply_lora(m, lcfg, dtype=lora_dtype)
        return m

    abstract = nnx.eval_shape(build)
    _, abs_state = nnx.split(abstract)
    if mesh is None:
        # without a sharding orbax restores host numpy arrays; ask for jax arrays on the
        # default device, as `model_from_tensors` makes
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        where = jax.tree.map(lambda _: dev, abs_state)
    else:
        from ..sharding import shardings
        where = shardings(abs_state, mesh, sharding)
    abs_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             abs_state, where)
    try:
        with ocp.StandardCheckpointer() as ck:
            state = ck.restore(path / STATE_DIR, abs_state)
    except Exception as e:
        raise LayerIFError(f"cannot restore {path / STATE_DIR}: {oneline(e)}") from None
    nnx.update(abstract, state)
    digests = (meta.get("layerif_jax_digests")
               if str(jnp.dtype(dtype)) == meta.get("layerif_jax_dtype") else None)
    _check(path, _state_arrays(abstract), digests)
    return abstract


def _check(path: Path, arrays: dict[str, Any], digests: dict[str, str] | None) -> None:
    """Every restored array against its stored SHA-256 and for NaN / inf, one array at a
    time on the host (never the whole model at once). An array spread over several
    processes cannot be hashed without gathering it: its local shards are checked for NaN
    / inf only."""
    names = sorted(arrays) if digests is None else sorted(set(arrays) | set(digests))
    for k in names:
        if k not in arrays or (digests is not None and k not in digests):
            raise LayerIFError(f"{path}: {k} does not match its stored checksum (the "
                               "checkpoint is corrupt)")
        x = arrays[k]
        if not getattr(x, "is_fully_addressable", True):
            parts = [np.asarray(sh.data) for sh in x.addressable_shards]
        else:
            parts = [np.asarray(jax.device_get(x))]
            if digests is not None and checksum.array_digest(parts[0]) != digests[k]:
                raise LayerIFError(f"{path}: {k} does not match its stored checksum (the "
                                   "checkpoint is corrupt)")
        if any(checksum.nonfinite({k: a}) for a in parts):
            raise LayerIFError(f"{path}: {k} holds NaN or inf values")
