"""Tokenizers: a transformers tokenizer from an HF directory, a converted
layerif_jax checkpoint directory, or a `.gguf` file (its embedded vocabulary)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LayerIFError
from .config import ModelConfig


def _oneline(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def load_tokenizer(path):
    """`AutoTokenizer` for `path` (a directory, or a .gguf file via `gguf_file=`)."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise LayerIFError(f"tokenizer not found: {p}")
    if not os.access(p, os.R_OK):
        raise LayerIFError(f"tokenizer not readable: {p}")
    try:
        if p.is_file():
            with open(p, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise LayerIFError(f"{p}: not a GGUF file or tokenizer directory")
            try:
                return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            except ImportError:
                # transformers reads GGUF metadata with torch; without torch (it is not a
                # runtime dependency) read it with the gguf package and reuse
                # transformers' converter, which needs no torch.
                return _gguf_tokenizer_without_torch(p)
        return AutoTokenizer.from_pretrained(str(p))
    except LayerIFError:
        raise
    except Exception as e:  # OSError, ValueError, KeyError ... from transformers
        raise LayerIFError(f"cannot load a tokenizer from {p}: {_oneline(e)}") from None


def _gguf_tokenizer_without_torch(path: Path):
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    reader = gguf.GGUFReader(str(path))
    meta = {name: f.contents() for name, f in reader.fields.items()
            if name.startswith("tokenizer.") or name == "general.architecture"}
    grouped = {group: {new: meta[f"tokenizer.{key}"] for key, new in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
    """Every token id the tokenizer can emit must index the model's embedding table."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise LayerIFError(
            f"tokenizer has {n} tokens but the model's vocabulary is {cfg.vocab_size}: "
            "tokenizer and checkpoint do not match")
