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


# files a tokenizer may consist of; `save_tokenizer_files` copies these and nothing else
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                 "processor_config.json")


def refuse_remote_code(folder: Path) -> None:
    """A checkpoint folder whose configs name custom code (`auto_map`) is refused: code
    that comes with a checkpoint is never run (transformers is also always called with
    trust_remote_code=False)."""
    import json

    for name in _CODE_CONFIGS:
        f = folder / name
        if not f.is_file():
            continue
        try:
            obj = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # a malformed file gets its own error where it is read
        if isinstance(obj, dict) and obj.get("auto_map"):
            raise LayerIFError(
                f"{f} names custom code to run (auto_map: {', '.join(map(str, obj['auto_map']))}); "
                "layerif never executes code that comes with a checkpoint: use a checkpoint "
                "without auto_map")


def save_tokenizer_files(tokenizer, dest: Path) -> None:
    """`tokenizer.save_pretrained`, keeping only the known tokenizer files (never code)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, dest / name)


def load_tokenizer(path):
    """`AutoTokenizer` for `path` (a directory, or a .gguf file via `gguf_file=`); never
    runs code from the checkpoint (`refuse_remote_code`)."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise LayerIFError(f"tokenizer not found: {p}")
    if not os.access(p, os.R_OK):
        raise LayerIFError(f"tokenizer not readable: {p}")
    refuse_remote_code(p.parent if p.is_file() else p)
    try:
        if p.is_file():
            with open(p, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise LayerIFError(f"{p}: not a GGUF file or tokenizer directory")
            try:
                return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name,
                                                     trust_remote_code=False)
            except ImportError:
                # transformers reads GGUF metadata with torch; without torch (it is not a
                # runtime dependency) read it with the gguf package and reuse
                # transformers' converter, which needs no torch.
                return _gguf_tokenizer_without_torch(p)
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
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
