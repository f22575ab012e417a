"""The pure, jitted step functions: losses over real rows, gradient accumulation, one
optimizer step, the evaluation loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import dtypes
from ..errors import LayerIFError
from ..loss import lm_loss
from ..models.lora import lora_config_of
from .config import optimizer_of

__all__ = ["split_model", "real_loss_sum", "accumulate", "accumulated_grads", "tree_norm",
           "train_step", "eval_loss_sum", "per_example_losses"]


def split_model(model):
    """(graphdef, lora_state, rest_state) of a model with LoRA."""
    if lora_config_of(model) is None or not nnx.state(model, nnx.LoRAParam):
        raise LayerIFError("the model has no LoRA adapters to train (apply LoRA first)")
    return nnx.split(model, nnx.LoRAParam, ...)


def real_loss_sum(graphdef, lora, rest, ids, mask, targets, index, key=None, *,
                  dtype: str = "float32", dropout: bool = False):
    """(sum of per-example losses over real rows, number of real rows) of one [B, T] batch.

    Per-example loss = mean token loss over the example's target tokens
    (`layerif_jax.loss.lm_loss`); rows with index -1 are fillers and contribute nothing,
    whatever their ids, mask or target flags. Pure; traced inside jit.
    """
    model = nnx.merge(graphdef, lora, rest)
    per = lm_loss(model, ids, mask, targets, dropout_key=key if dropout else None,
                  dtype=dtypes.jnp_dtype(dtype))
    real = index >= 0
    return jnp.sum(jnp.where(real, per, 0.0)), jnp.sum(real)


def accumulate(fn: Callable, params, micro):
    """Sums over micro-batches (a scan: one micro-batch of activations alive at a time)
    of fn(params, *m) -> (objective, stats) and of the objective's gradient. `micro`:
    arrays with a leading micro-batch axis. Returns (gradient sums in float32, shaped like
    `params`; stats sums). The one gradient accumulation of LoRA and LoRA-MoE training."""
    g_fn = jax.grad(fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro)
    stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          jax.eval_shape(lambda: fn(params, *first)[1]))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)

    def body(carry, xs):
        gsum, ssum = carry
        g, st = g_fn(params, *xs)
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), gsum, g),
                jax.tree.map(jnp.add, ssum, st)), None

    (gsum, ssum), _ = jax.lax.scan(body, (zeros, stats0), micro)
    return gsum, ssum


def accumulated_grads(graphdef, lora, rest, ids, mask, targets, index, key=None, *,
                      dtype: str = "float32", dropout: bool = False):
    """Mean loss over the real rows of a block of micro-batches and its LoRA gradient.

    ids/mask/targets: [A, B, T]; index: [A, B] (-1 = filler row). The micro-batch loss
    *sums* are accumulated (`accumulate`) and divided once by the real-row count of the
    whole block. Returns (loss, n_real_rows, grads) with grads shaped like `lora`
    (float32). Pure; traced inside jit.
    """
    keys = jax.random.split(key if key is not None else jax.random.key(0), ids.shape[0])

    def summed(lora_, ids_, mask_, tgt_, idx_, key_):
        lsum = real_loss_sum(graphdef, lora_, rest, ids_, mask_, tgt_, idx_, key_,
                             dtype=dtype, dropout=dropout)[0]
        return lsum, lsum

    gsum, lsum = accumulate(summed, lora, (ids, mask, targets, index, keys))
    n = jnp.sum(index >= 0)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    return lsum / denom, n, jax.tree.map(lambda g: g / denom, gsum)


tree_norm = (optax.tree.norm if hasattr(getattr(optax, "tree", None), "norm")
              else optax.global_norm)


def _train_step_impl(lora, opt_state, rest, ids, mask, targets, index, base_key, step, *,
                     graphdef, opt_spec, dtype, dropout):
    """One optimizer step; the dropout key is fold_in(base_key, step) (reproducible on resume)."""
    tx = optimizer_of(*opt_spec)
    key = jax.random.fold_in(base_key, step)
    loss, n, grads = accumulated_grads(graphdef, lora, rest, ids, mask, targets, index, key,
                                       dtype=dtype, dropout=dropout)
    gnorm = tree_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, {"loss": loss, "grad_norm": gnorm, "rows": n}


# graphdef / optimizer spec / dtype / dropout are static: one compile per distinct setting,
# shared across finetune() calls (an interrupted run and its resumption compile once).
train_step = jax.jit(_train_step_impl, static_argnames=("graphdef", "opt_spec", "dtype", "dropout"))


def _eval_impl(lora, rest, ids, mask, targets, index, *, graphdef, dtype):
    return real_loss_sum(graphdef, lora, rest, ids, mask, targets, index, dtype=dtype)


eval_loss_sum = jax.jit(_eval_impl, static_argnames=("graphdef", "dtype"))


def _per_example_impl(lora, rest, ids, mask, targets, *, graphdef, dtype="float32"):
    return lm_loss(nnx.merge(graphdef, lora, rest), ids, mask, targets,
                   dtype=dtypes.jnp_dtype(dtype))


# [B] per-row losses of one padded batch (filler rows included: the caller drops them)
per_example_losses = jax.jit(_per_example_impl, static_argnames=("graphdef", "dtype"))
