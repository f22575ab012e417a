"""Logit parity of the NNX decoder against transformers' torch models (eager attention).

Tiny random configs of every supported family, every weight perturbed from its
init; float32 tolerance max|diff| / max|logit| <= 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from layerif_jax.models import decoder as dec  # noqa: E402

TOL = 1e-4
FAMILIES = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "mistral_window": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "gemma": ("gemma", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_bias": ("qwen3", {"attention_bias": True}),
    "gemma2": ("gemma2", {}),
}
B, T = 2, 11


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_CACHE: dict = {}


@pytest.fixture
def pair(request, tiny_hf_model, to_layerif):
    """(torch model, layerif model) for a FAMILIES key, built once per session."""
    key = request.param
    if key not in _CACHE:
        fam, kw = FAMILIES[key]
        hf = tiny_hf_model(fam, seed=len(_CACHE), **kw)
        _CACHE[key] = (hf, to_layerif(hf))
    return _CACHE[key]


def _ids(seed=0, b=B, t=T):
    return np.random.default_rng(seed).integers(3, 97, size=(b, t)).astype(np.int64)


def _hf_logits(hf, ids, mask=None, pos=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.from_numpy(np.asarray(mask, np.int64))
    if pos is not None:
        kw["position_ids"] = torch.from_numpy(np.asarray(pos, np.int64))
    with torch.no_grad():
        return hf(torch.from_numpy(ids), **kw).logits.float().numpy()


@nnx.jit
def _fwd(model, ids, mask, pos):
    return model(ids, mask, positions_BT=pos)


def _ours(model, ids, mask=None, pos=None):
    """Jitted forward (an eager call re-traces the layer scan every time)."""
    b, t = ids.shape
    mask = np.ones((b, t), bool) if mask is None else mask
    pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
    return np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask, bool),
                           jnp.asarray(pos, jnp.int32)))


@pytest.mark.parametrize("pair", list(FAMILIES), indirect=True)
def test_logits_and_first_block(pair):
    hf, ours = pair
    ids = _ids()
    seen = {}

    def pre(mod, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach().numpy()

    def post(mod, args, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out).detach().numpy()

    hooks = [hf.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True),
             hf.model.layers[0].register_forward_hook(post)]
    try:
        ref = _hf_logits(hf, ids)
    finally:
        for h in hooks:
            h.remove()
    got = _ours(ours, ids)
    assert got.shape == ref.shape == (B, T, 97)
    assert rel_err(got, ref) <= TOL

    # embeddings (Gemma's sqrt(d) scaling included) and the first block alone
    emb = ours.embed(jnp.asarray(ids))
    assert rel_err(emb, seen["in"]) <= 1e-6
    cfg = ours.cfg
    p0 = jax.tree.map(lambda a: a[0], ours.layers.layer_arrays())
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    bias = dec.attention_bias(jnp.ones((B, T), bool), pos, cfg.window_of(0))
    out0 = dec.block_apply(cfg, p0, emb, bias, pos, dec.rope_inv_freq(cfg), lora={}, key=None,
                           dtype=jnp.float32)
    assert rel_err(out0, seen["out"]) <= TOL


@pytest.mark.parametrize("pair", list(FAMILIES), indirect=True)
def test_right_and_left_padding(pair):
    hf, ours = pair
    ids = _ids(1)
    n = 7  # real tokens of the second (shorter) sequence
    alone = _hf_logits(hf, ids[1:, :n])  # the short sequence on its own, no padding

    # right padding: HF's default positions (arange) are right for both
    mask = np.ones((B, T), np.int64)
    mask[1, n:] = 0
    got, ref = _ours(ours, ids, mask), _hf_logits(hf, ids, mask)
    assert rel_err(got[0], ref[0]) <= TOL
    assert rel_err(got[1, :n], ref[1, :n]) <= TOL
    assert rel_err(got[1, :n], alone[0]) <= TOL
    assert np.isfinite(got).all()

    # left padding: HF does not derive positions from the mask, so pass them to both
    lids = ids.copy()
    lids[1, T - n:] = ids[1, :n]
    lids[1, :T - n] = 0
    lmask = np.ones((B, T), np.int64)
    lmask[1, :T - n] = 0
    pos = np.clip(np.cumsum(lmask, axis=1) - 1, 0, None)
    got, ref = _ours(ours, lids, lmask, pos), _hf_logits(hf, lids, lmask, pos)
    assert rel_err(got[0], ref[0]) <= TOL
    assert rel_err(got[1, T - n:], ref[1, T - n:]) <= TOL
    assert rel_err(got[1, T - n:], alone[0]) <= TOL  # padding changes nothing
    assert np.isfinite(got).all()


@pytest.mark.parametrize("pair", ["mistral_window"], indirect=True)
def test_sliding_window_matters(pair, to_layerif):
    """T=11 > window=4: the window must change the output, on both sides equally."""
    hf, ours = pair
    assert ours.cfg.sliding_window == 4
    ids = _ids(2)
    ref = _hf_logits(hf, ids)
    got = _ours(ours, ids)
    assert rel_err(got, ref) <= TOL
    hf.config.sliding_window = None
    try:
        ref_full = _hf_logits(hf, ids)
        ours_full = to_layerif(hf)
    finally:
        hf.config.sliding_window = 4
    assert ours_full.cfg.sliding_window is None
    full = _ours(ours_full, ids)
    assert rel_err(full, ref_full) <= TOL
    # positions < window see the same keys either way; later ones must differ
    assert rel_err(full[:, :4], got[:, :4]) <= TOL
    assert rel_err(full[:, 4:], got[:, 4:]) > 1e-2


@pytest.mark.parametrize("pair", ["llama", "gemma"], indirect=True)
def test_bfloat16(pair, to_layerif):
    hf, ours = pair
    ours16 = to_layerif(hf, "bfloat16")
    assert ours16.dtype == jnp.bfloat16
    ids = _ids(3)
    got = _ours(ours16, ids)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert rel_err(got, _ours(ours, ids)) <= 5e-2
