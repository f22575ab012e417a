"""Perplexity over non-overlapping windows of a raw text (the WikiText-2 protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..data import encode_text, read_text
from ..errors import LayerIFError
from ..stop import check as check_stop
from .loglik import check_ids, progress_bar, row_logprob


def perplexity(model, tokenizer, text_path, window: int = 1024, max_tokens: int | None = None,
               batch_size: int = 4, *, progress: bool = True) -> dict[str, Any]:
    """Perplexity over non-overlapping `window`-token windows of the joined text.

    `max_tokens` keeps the first N tokens of the tokenised text. Returns
    {"perplexity", "nll" (mean per predicted token), "n_windows", "n_tokens"
    (predicted tokens), "window"}.
    """
    if window < 2:
        raise LayerIFError(f"window must be >= 2, got {window}")
    if batch_size < 1:
        raise LayerIFError(f"batch size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise LayerIFError(f"max_tokens must be >= 1, got {max_tokens}")
    if window > model.cfg.max_position_embeddings:
        raise LayerIFError(f"window {window} exceeds the model's context "
                           f"({model.cfg.max_position_embeddings})")
    text = read_text(Path(text_path))
    ids = np.asarray(encode_text(tokenizer, text), np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = ids.size // window
    if n_win < 1:
        raise LayerIFError(f"{text_path}: {ids.size} tokens, fewer than one window of {window}")
    check_ids(ids, model.cfg, str(text_path))
    wins = ids[: n_win * window].reshape(n_win, window)
    total = 0.0
    count = 0
    bar = progress_bar(-(-n_win // batch_size), "perplexity", progress)
    for s in range(0, n_win, batch_size):
        check_stop()
        chunk = wins[s:s + batch_size]
        b = chunk.shape[0]
        batch = np.zeros((batch_size, window), np.int32)
        batch[:b] = chunk
        targets = np.zeros((batch_size, window), bool)
        targets[:b, 1:] = True  # filler rows count nothing
        lp, n = row_logprob(model, jnp.asarray(batch), jnp.ones((batch_size, window), bool),
                             jnp.asarray(targets))
        total -= float(np.sum(np.asarray(lp, np.float64)))
        count += int(jnp.sum(n))
        bar.update(1)
    bar.close()
    nll = total / count
    return {"perplexity": float(np.exp(nll)), "nll": float(nll), "n_windows": int(n_win),
            "n_tokens": int(count), "window": int(window)}
