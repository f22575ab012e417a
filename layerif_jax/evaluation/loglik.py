"""The one log-likelihood scorer: sum of log p(token) over marked tokens, per row
(perplexity, multiple choice, task accuracy by likelihood all use it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import LayerIFError


@nnx.jit
def row_logprob(model, ids, mask, targets):
    """ids/mask/targets [B, T]; targets[t]: token t is scored (predicted from t - 1).

    Returns (sum log p over targets, number of targets), both [B], float32.
    """
    logits = model(ids, mask)[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tok = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    t = targets[:, 1:]
    return jnp.sum(jnp.where(t, tok - lse, 0.0), axis=1), jnp.sum(t, axis=1)


def check_ids(ids: np.ndarray, cfg, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise LayerIFError(f"{what}: token ids outside the model's vocabulary "
                           f"[0, {cfg.vocab_size}): tokenizer and model do not match")


def progress_bar(total, desc, progress):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False)
