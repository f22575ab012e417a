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
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p))
    except LayerIFError:
        raise
    except Exception as e:  # OSError, ValueError, KeyError ... from transformers
        raise LayerIFError(f"cannot load a tokenizer from {p}: {_oneline(e)}") from None


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
    """Every token id the tokenizer can emit must index the model's embedding table."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise LayerIFError(
            f"tokenizer has {n} tokens but the model's vocabulary is {cfg.vocab_size}: "
            "tokenizer and checkpoint do not match")
