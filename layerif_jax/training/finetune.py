"""LoRA fine-tuning of a model (`finetune`) and its validation loss."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from .. import dtypes
from ..data import Example, epoch_batches
from ..formats.peft import save_peft_adapter
from ..models.lora import lora_config_of
from .config import TrainConfig, opt_spec, optimizer_of
from .loop import (
    cast_like,
    finish_run,
    fit_examples,
    float32_master,
    pad_length,
    prepare_run,
    run_dir,
    run_fingerprint,
    train_loop,
)
from .steps import eval_loss_sum, split_model, train_step

__all__ = ["finetune", "evaluate", "batch_loss", "validation_loss"]


def finetune(model, train_examples: Sequence[Example], out_dir, cfg: TrainConfig | None = None,
             *, val_examples: Sequence[Example] | None = None, progress: bool = True,
             max_steps: int | None = None, pad_id: int = 0, base_model_name: str = "",
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the LoRA parameters of `model` (in place) on `train_examples`.

    `out_dir`: a path or an open `io.OutputDir` (locked; files of others in it are
    refused unless `overwrite`). Writes orbax checkpoints under out_dir/checkpoints and
    resumes from the newest intact one when its fingerprint (settings, data, base
    weights, initial adapter: `run_fingerprint`) matches; another run's is refused. On
    completion commits out_dir/adapter (PEFT format), out_dir/train_state.json and
    out_dir/history.json. `max_steps`: stop (with a checkpoint) once the global
    optimizer step reaches it, without changing the schedule; a later call resumes.
    Returns the history: per-step train_loss / lr / grad_norm, per-epoch records, step
    counts.
    """
    cfg = cfg or TrainConfig()
    run = prepare_run(train_examples, val_examples, cfg, max_steps)
    train, val, T_val, total = run.train, run.val, run.val_length, run.total_steps
    lcfg = lora_config_of(model)
    graphdef, lora, rest = split_model(model)
    lora, orig_dtypes = float32_master(lora)
    spec = opt_spec(cfg, total)
    dropout = lcfg.dropout > 0
    base_key = jax.random.key(cfg.seed)  # dropout key of step s: fold_in(base_key, s)
    lora_fp = {"rank": lcfg.rank, "alpha": lcfg.alpha, "dropout": lcfg.dropout,
               "targets": list(lcfg.targets)}
    fp = run_fingerprint(cfg, train, total, model_config=model.cfg, base=rest, init=lora,
                         lora=lora_fp)

    def step_fn(lora, opt_state, ids, mask, tgt, idx, step):
        return train_step(lora, opt_state, rest, ids, mask, tgt, idx, base_key, np.int32(step),
                          graphdef=graphdef, opt_spec=spec, dtype=cfg.compute_dtype,
                          dropout=dropout)

    with run_dir(out_dir, "finetune", overwrite) as out:
        res = train_loop(
            lora, optimizer_of(*spec).init(lora), step_fn, cfg=cfg, train=train,
            out_dir=out.path, fingerprint=fp, state_key="lora",
            stats_keys={"train_loss": "loss", "grad_norm": "grad_norm"},
            val_loss=((lambda p: evaluate(graphdef, p, rest, val, cfg, T_val, pad_id))
                      if val else None),
            max_steps=max_steps, progress=progress, pad_id=pad_id, desc="finetune")
        nnx.update(model, cast_like(res.params, orig_dtypes))
        finish_run(out, res.history, {
            "epochs_done": res.step // res.history["steps_per_epoch"],
            "config": dataclasses.asdict(cfg), "lora": lora_fp, "n_train": len(train),
            "n_val": len(val) if val else 0, "padded_length": pad_length(train, cfg.max_len),
            "base_model": base_model_name or None},
            lambda p: save_peft_adapter(model, p, base_model_name=base_model_name))
    return res.history


def evaluate(graphdef, lora, rest, examples: Sequence[Example], cfg: TrainConfig,
             length: int, pad_id: int = 0) -> float:
    """Mean (over examples) of the per-example mean token loss; dropout off."""
    total, n = 0.0, 0
    for batch in epoch_batches(examples, cfg.batch_size, seed=0, epoch=0, max_len=length,
                               pad_id=pad_id, shuffle=False):
        s, k = eval_loss_sum(lora, rest, batch.ids, batch.mask, batch.targets, batch.index,
                             graphdef=graphdef, dtype=cfg.compute_dtype)
        total += float(s)
        n += int(k)
    return total / max(n, 1)


def batch_loss(model, batch, dtype: str = "float32") -> float:
    """Training loss of one padded `data.Batch`: mean over its real rows (dropout off)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    s, k = eval_loss_sum(lora, rest, batch.ids, batch.mask, batch.targets, batch.index,
                         graphdef=graphdef, dtype=dtypes.name(dtype))
    return float(s) / max(int(k), 1)


def validation_loss(model, examples: Sequence[Example], cfg: TrainConfig | None = None,
                    pad_id: int = 0) -> float:
    """Mean per-example loss of `model` (LoRA or not) on `examples`, dropout off."""
    cfg = cfg or TrainConfig()
    ex = fit_examples(examples, cfg.max_len, "validation")
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    return evaluate(graphdef, lora, rest, ex, cfg, pad_length(ex, cfg.max_len), pad_id)
