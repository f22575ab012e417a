"""Training the experts and routers (the shared training loop, resumable)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ... import dtypes
from ...data import Example, epoch_batches
from ...errors import LayerIFError
from ...loss import example_losses
from .adapter import save_moe_adapter
from .model import TRAINABLE, MoELoraModel

__all__ = ["split_moe", "moe_train_step", "moe_eval_sums", "moe_validation_loss", "train_moe"]


def split_moe(model: MoELoraModel):
    """(graphdef, trainable state = experts + routers, frozen rest)."""
    if not isinstance(model, MoELoraModel):
        raise LayerIFError("train_moe needs a MoELoraModel")
    return nnx.split(model, TRAINABLE, ...)


def _moe_loss_sum(graphdef, train, rest, ids, mask, targets, index, *, dtype, aux_coef):
    """Objective summed over real rows (+ aux_coef * balance loss * real rows) and stats."""
    model = nnx.merge(graphdef, train, rest)
    logits, aux = model(ids, mask, dtype=dtypes.jnp_dtype(dtype), return_aux=True)
    per = example_losses(logits, ids, targets)
    real = index >= 0
    n = jnp.sum(real).astype(jnp.float32)
    lsum = jnp.sum(jnp.where(real, per, 0.0))
    obj = lsum + aux_coef * aux * n if aux_coef else lsum
    return obj, (lsum, aux * n, n)


def _moe_step_impl(train, opt_state, rest, ids, mask, targets, index, *, graphdef, opt_spec,
                   dtype, aux_coef):
    from ...training import accumulate, optimizer_of, tree_norm

    tx = optimizer_of(*opt_spec)
    gsum, (lsum, asum, _) = accumulate(
        lambda t, *xs: _moe_loss_sum(graphdef, t, rest, *xs, dtype=dtype, aux_coef=aux_coef),
        train, (ids, mask, targets, index))
    n = jnp.sum(index >= 0)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, gsum)
    updates, opt_state = tx.update(grads, opt_state, train)
    train = optax.apply_updates(train, updates)
    return train, opt_state, {"loss": lsum / denom, "aux": asum / denom,
                              "grad_norm": tree_norm(grads), "rows": n}


moe_train_step = jax.jit(_moe_step_impl,
                         static_argnames=("graphdef", "opt_spec", "dtype", "aux_coef"))


def _moe_eval_impl(train, rest, ids, mask, targets, index, *, graphdef, dtype):
    return _moe_loss_sum(graphdef, train, rest, ids, mask, targets, index, dtype=dtype,
                         aux_coef=0.0)[1]


moe_eval_sums = jax.jit(_moe_eval_impl, static_argnames=("graphdef", "dtype"))


def moe_validation_loss(model: MoELoraModel, examples: Sequence[Example], cfg=None,
                        pad_id: int = 0) -> float:
    """Mean per-example loss on `examples` (no balance loss)."""
    from ...training import TrainConfig, fit_examples, pad_length
    cfg = cfg or TrainConfig()
    ex = fit_examples(examples, cfg.max_len, "validation")
    graphdef, train, rest = split_moe(model)
    return _evaluate(graphdef, train, rest, ex, cfg, pad_length(ex, cfg.max_len), pad_id)


def _evaluate(graphdef, train, rest, examples, cfg, length, pad_id):
    total, n = 0.0, 0
    for batch in epoch_batches(examples, cfg.batch_size, seed=0, epoch=0, max_len=length,
                               pad_id=pad_id, shuffle=False):
        s, _, k = moe_eval_sums(train, rest, batch.ids, batch.mask, batch.targets, batch.index,
                                graphdef=graphdef, dtype=cfg.compute_dtype)
        total += float(s)
        n += int(k)
    return total / max(n, 1)


def train_moe(moe_model: MoELoraModel, train_examples: Sequence[Example], out_dir,
              cfg=None, *, val_examples: Sequence[Example] | None = None,
              max_steps: int | None = None, aux_coef: float = 0.0, progress: bool = False,
              pad_id: int = 0, base_model_name: str = "", overwrite: bool = False
              ) -> dict[str, Any]:
    """Train the experts and routers of `moe_model` (in place); the base stays frozen.

    AdamW on `train.make_schedule` (linear warm-up, then linear decay to 0), global-norm
    clipping (cfg.max_grad_norm), gradient accumulation as a scan inside one jitted step
    (the loss of a step is the mean over the real rows of the effective batch). Data order
    depends on (seed, epoch) only, so an orbax checkpoint at step s (out_dir/checkpoints:
    trainable state, AdamW state, history, checksums) resumes to the uninterrupted
    trajectory when its fingerprint (settings, data, base weights, initial experts)
    matches. `out_dir`: a path or an open `io.OutputDir`. `max_steps` stops early (with a
    checkpoint) without changing the schedule. On completion commits out_dir/adapter
    (`save_moe_adapter`), history.json, train_state.json.
    """
    from ...training import (
        TrainConfig,
        cast_like,
        finish_run,
        float32_master,
        opt_spec,
        optimizer_of,
        pad_length,
        prepare_run,
        run_dir,
        run_fingerprint,
        train_loop,
    )

    cfg = cfg or TrainConfig()
    run = prepare_run(train_examples, val_examples, cfg, max_steps)
    tr, val, T_val, total = run.train, run.val, run.val_length, run.total_steps
    if not (isinstance(aux_coef, (int, float)) and math.isfinite(aux_coef) and aux_coef >= 0):
        raise LayerIFError(f"aux_coef must be >= 0, got {aux_coef!r}")
    aux_coef = float(aux_coef)
    graphdef, train, rest = split_moe(moe_model)
    train, orig_dtypes = float32_master(train)
    spec = opt_spec(cfg, total)
    fp = run_fingerprint(cfg, tr, total, model_config=moe_model.cfg, base=rest, init=train,
                         moe=moe_model.spec(), aux_coef=aux_coef)

    def step_fn(train, opt_state, ids, mask, tgt, idx, step):
        return moe_train_step(train, opt_state, rest, ids, mask, tgt, idx, graphdef=graphdef,
                              opt_spec=spec, dtype=cfg.compute_dtype, aux_coef=aux_coef)

    with run_dir(out_dir, "moe train", overwrite) as out:
        res = train_loop(
            train, optimizer_of(*spec).init(train), step_fn, cfg=cfg, train=tr,
            out_dir=out.path, fingerprint=fp, state_key="train",
            stats_keys={"train_loss": "loss", "aux_loss": "aux", "grad_norm": "grad_norm"},
            val_loss=((lambda p: _evaluate(graphdef, p, rest, val, cfg, T_val, pad_id))
                      if val else None),
            max_steps=max_steps, progress=progress, pad_id=pad_id, desc="moe")
        nnx.update(moe_model, cast_like(res.params, orig_dtypes))
        finish_run(out, res.history, {
            "config": dataclasses.asdict(cfg), "moe": moe_model.spec(), "aux_coef": aux_coef,
            "n_train": len(tr), "n_val": len(val) if val else 0,
            "padded_length": pad_length(tr, cfg.max_len),
            "base_model": base_model_name or None},
            lambda p: save_moe_adapter(moe_model, p, base_model_name=base_model_name))
    return res.history
