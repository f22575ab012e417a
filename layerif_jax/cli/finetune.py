"""`layerif finetune`: LoRA fine-tuning with AdamW, checkpoints, resume (METHOD.md 1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .common import (Command, LoraArgs, ModelArgs, OverwriteArgs, TrainArgs, examples,
                     load_model_checked, load_tokenizer_of, out_dir, pad_id)
from .options import REQUIRED, opt, output_path


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(OverwriteArgs, LoraArgs, TrainArgs, ModelArgs):
    out: str = opt(REQUIRED, "output dir: adapter/, checkpoints/, history.json, "
                             "train_state.json (a rerun resumes from it)", type=output_path)

    def __post_init__(self):
        self.lora_config()   # bad targets, dropout ...: before anything is loaded
        self.train_config()


def finetune_into(cfg: FinetuneConfig, out, rt, tok=None):
    """Fine-tune into the open OutputDir `out`; returns (history, model, tokenizer, source)."""
    from flax import nnx

    from ..models.lora import apply_lora
    from ..training import finetune

    source = cfg.model_source()
    tok = tok or load_tokenizer_of(source)
    train = examples(tok, cfg.data, cfg.limit, cfg.max_len, cfg.mask_prompt, "training records")
    val = (examples(tok, cfg.val, cfg.val_limit, cfg.max_len, cfg.mask_prompt,
                    "validation records") if cfg.val else None)
    model = load_model_checked(source, cfg.dtype, tok)
    apply_lora(model, cfg.lora_config(), rngs=nnx.Rngs(cfg.seed))
    hist = finetune(model, train, out, cfg.train_config(), val_examples=val,
                    progress=rt.progress, pad_id=pad_id(tok), base_model_name=source)
    return hist, model, tok, source


def run(cfg: FinetuneConfig, rt) -> None:
    with out_dir(cfg.out, "finetune", cfg.overwrite) as out:
        hist, *_ = finetune_into(cfg, out, rt)
    last = hist["epochs"][-1] if hist.get("epochs") else {}
    print(f"fine-tuned LoRA on {cfg.data}: {json.dumps(last)}")
    print(f"adapter: {Path(cfg.out) / 'adapter'}")


COMMAND = Command(
    "finetune", "LoRA fine-tuning with AdamW (resumes from its output dir)", FinetuneConfig,
    run, stopped="a checkpoint was saved after the last finished step; run the same "
                 "command again to resume")
