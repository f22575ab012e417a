"""Checkpoint formats, one reader and one writer each, and the dispatch.

`load_model(path, dtype)` accepts
  * a Hugging Face directory: `config.json` + `model.safetensors`, or sharded
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` (`hf`);
  * a `.gguf` file (llama, qwen2, gemma architectures; every quantisation the
    `gguf` package dequantises) (`gguf`);
  * a directory written by `save_checkpoint` / `convert` (`native`).
Writers: `export_hf` (Hugging Face), `save_checkpoint` (native), `peft.save_peft_adapter`.
Tensors are read lazily (one stacked parameter staged on the host at a time); every
writer commits through `io.OutputDir`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .. import dtypes
from ..errors import LayerIFError
from ..io import read_json
from ..models.config import SUPPORTED, ModelConfig
from ..models.decoder import Decoder
from . import gguf, hf, native
from .gguf import permute_rotary, unpermute_rotary
from .hf import export as export_hf
from .native import FORMAT_KEY, save as save_checkpoint

gguf_config = gguf.config

__all__ = ["load_model", "load_config", "convert", "export_hf", "save_checkpoint", "gguf_config",
           "permute_rotary", "unpermute_rotary"]


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _source(path) -> tuple[Path, dict | None]:
    """(the checkpoint's path, its config.json) or (the .gguf file, None); refused when
    missing, unreadable or of no known format."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LayerIFError(f"checkpoint not found: {p}")
    if not os.access(p, os.R_OK):
        raise LayerIFError(f"checkpoint not readable: {p}")
    if p.is_file():
        if is_gguf(p):
            return p, None
        if p.name == "config.json":
            return _source(p.parent)
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
    if FORMAT_KEY not in meta and meta.get("model_type") not in SUPPORTED:
        raise LayerIFError(f"{p}: unsupported architecture {meta.get('model_type')!r} "
                           f"(supported: {', '.join(SUPPORTED)})")
    return p, meta


def load_model(path, dtype="float32", *, mesh=None, sharding: str = "fsdp") -> Decoder:
    """Load a Hugging Face safetensors directory, a .gguf file or a project checkpoint.

    mesh: a ("data", "model") mesh (`sharding.make_mesh`) to load onto, every parameter
    laid out as the `sharding` preset says. A Hugging Face directory is read straight
    into its shards (each process reads only the slices its devices hold), a project
    checkpoint (`convert`) is restored by orbax straight into them; a GGUF file (whose
    quantised blocks dequantise whole) is read whole on the host, then put into its
    shards."""
    dt = dtypes.jnp_dtype(dtype)
    p, meta = _source(path)
    if mesh is not None:
        from ..sharding import as_2d, check_mesh
        mesh = check_mesh(as_2d(mesh), sharding)
    if meta is None:
        return _put_model(gguf.read(p, dt), mesh, sharding)
    if FORMAT_KEY in meta:
        return native.read(p, meta, dt, mesh, sharding)
    return hf.read(p, dt, mesh, sharding)


def _put_model(model: Decoder, mesh, preset: str) -> Decoder:
    if mesh is None:
        return model
    from flax import nnx

    from ..influence.distributed import put
    from ..sharding import shardings
    state = nnx.state(model)
    nnx.update(model, put(state, shardings(state, mesh, preset)))
    return model


def load_config(path) -> ModelConfig:
    """The ModelConfig of a checkpoint (as `load_model` takes), reading no tensor."""
    p, meta = _source(path)
    return gguf.config(p) if meta is None else ModelConfig.from_hf(meta)


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


