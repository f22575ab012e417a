"""Per-example language-model loss: mean next-token cross-entropy over target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def example_losses(logits_BTV: jax.Array, ids_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """loss_B = mean over t with targets[t] of -log p(ids[t] | ids[<t]); 0 for rows with no target.

    logits[t] predicts token t+1, so position 0 is never a target.
    """
    logp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)[..., 0]
    w = targets_BT[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def lm_loss(model, ids_BT, mask_BT, targets_BT, *, dropout_key=None, dtype=None) -> jax.Array:
    """Per-example losses [B] of an NNX decoder on one padded batch."""
    logits = model(ids_BT, mask_BT, dropout_key=dropout_key, dtype=dtype)
    return example_losses(logits, ids_BT, targets_BT)
