"""layerif_jax.loss: per-example mean next-token cross-entropy over the target tokens,
against a float64 NumPy loop and against transformers' own loss (labels -100 off)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.loss import example_losses, lm_loss


def reference_losses(logits, ids, targets):
    """Plain float64: for each row, mean over t >= 1 with targets[t] of
    -log softmax(logits[t - 1])[ids[t]]; 0 where nothing counts."""
    out = []
    for lg, row, tg in zip(np.asarray(logits, np.float64), ids, targets):
        terms = []
        for t in range(1, len(row)):
            if tg[t]:
                z = lg[t - 1] - lg[t - 1].max()
                terms.append(np.log(np.exp(z).sum()) - z[row[t]])
        out.append(np.mean(terms) if terms else 0.0)
    return np.array(out)


def test_example_losses_match_numpy():
    rng = np.random.default_rng(0)
    B, T, V = 4, 7, 11
    logits = rng.normal(size=(B, T, V)) * 3
    ids = rng.integers(0, V, (B, T))
    targets = rng.random((B, T)) < 0.6
    targets[0, 0] = True            # position 0 is never a target, whatever the mask says
    targets[3] = False              # a row with nothing to predict has loss 0
    got = np.asarray(example_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(ids),
                                    jnp.asarray(targets)))
    want = reference_losses(logits, ids, targets)
    assert want[3] == 0.0 and got[3] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_example_losses_upcast_bfloat16_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    ids, targets = rng.integers(0, 9, (2, 5)), np.ones((2, 5), bool)
    got = example_losses(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ids), jnp.asarray(targets))
    assert got.dtype == jnp.float32
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), reference_losses(bf, ids, targets), rtol=1e-5)


def test_lm_loss_matches_transformers(tiny_hf_model, to_layerif):
    torch = pytest.importorskip("torch")
    hf = tiny_hf_model("llama", seed=3)
    model = to_layerif(hf)
    rng = np.random.default_rng(2)
    B, T = 3, 9
    ids = rng.integers(3, 97, (B, T))
    lengths = [9, 6, 4]
    mask = np.arange(T)[None] < np.array(lengths)[:, None]      # right padding
    targets = mask & (np.arange(T)[None] >= 2)                  # a two-token "prompt"
    got = np.asarray(lm_loss(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(targets)))
    for b in range(B):
        n = lengths[b]
        labels = torch.from_numpy(np.where(targets[b, :n], ids[b, :n], -100)[None])
        with torch.no_grad():
            want = float(hf(torch.from_numpy(ids[b:b + 1, :n]), labels=labels).loss)
        assert got[b] == pytest.approx(want, rel=1e-5), b
