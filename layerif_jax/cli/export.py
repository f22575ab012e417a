"""`layerif export CKPT OUT`: a checkpoint (+ adapter) -> a Hugging Face safetensors dir."""

from __future__ import annotations

import dataclasses

from ..errors import LayerIFError
from .common import DTYPES, Command, OverwriteArgs, out_dir
from .options import REQUIRED, input_path, opt, output_path


@dataclasses.dataclass(frozen=True)
class ExportConfig(OverwriteArgs):
    ckpt: str = opt(REQUIRED, "HF dir, .gguf file or a `layerif convert` output",
                    type=input_path("checkpoint"), positional=True)
    out: str = opt(REQUIRED, "output HF dir (config.json, model.safetensors, tokenizer)",
                   type=output_path, positional=True)
    dtype: str = opt("float32", "dtype of the loaded and written parameters", choices=DTYPES)
    lora: str | None = opt(None, "adapter to include (PEFT dir or `layerif finetune` output)",
                           type=input_path("adapter"), shown="none")
    no_merge: bool = opt(False, "write the adapter to OUT/adapter instead of merging it")


def run(cfg: ExportConfig, rt) -> None:
    from ..formats import export_hf, load_model
    from ..models.tokenizer import load_tokenizer

    with out_dir(cfg.out, "export", cfg.overwrite) as out:
        model = load_model(cfg.ckpt, cfg.dtype)
        if cfg.lora:
            from ..formats.peft import load_adapter
            load_adapter(model, cfg.lora)
        try:
            tok = load_tokenizer(cfg.ckpt)
        except LayerIFError:
            tok = None
        path = export_hf(model, out, merge_lora=not cfg.no_merge, tokenizer=tok)
    print(f"exported {cfg.ckpt} -> {path}")


COMMAND = Command("export", "a checkpoint -> Hugging Face safetensors dir", ExportConfig, run)
