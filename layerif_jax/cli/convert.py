"""`layerif convert SRC OUT`: a Hugging Face dir or GGUF -> the project's orbax checkpoint."""

from __future__ import annotations

import dataclasses

from .common import DTYPES, Command, OverwriteArgs, out_dir
from .options import REQUIRED, input_path, opt, output_path


@dataclasses.dataclass(frozen=True)
class ConvertConfig(OverwriteArgs):
    src: str = opt(REQUIRED, "HF safetensors dir (sharded too) or .gguf file",
                   type=input_path("checkpoint"), positional=True)
    out: str = opt(REQUIRED, "output dir (config.json, state/, the tokenizer's files)",
                   type=output_path, positional=True)
    dtype: str = opt("float32", "dtype of the written parameters", choices=DTYPES)


def run(cfg: ConvertConfig, rt) -> None:
    from ..formats import convert

    with out_dir(cfg.out, "convert", cfg.overwrite) as out:
        path = convert(cfg.src, out, cfg.dtype)
    print(f"converted {cfg.src} -> {path}")


COMMAND = Command("convert", "HF dir or GGUF -> the project's checkpoint (orbax)", ConvertConfig,
                  run)
