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

from layerif_jax.model import decoder as dec  # noqa: E402

TOL = 1e-4
FAMILIES = {
    "llama": ("llama", {}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "mistral_window": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "gemma": ("gemma", {}),
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
    bias = dec.attention_bias(jnp.ones((B, T), bool), pos, cfg.sliding_window)
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


def test_folded_linear_value_and_input_gradient():
    """The influence path's folded LoRA map: value and x-gradient against float64 NumPy."""
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(2, 5, 6)), rng.normal(size=(6, 4))
    A, B, r = rng.normal(size=(6, 3)), rng.normal(size=(3, 4)), rng.normal(size=(2, 5, 4))
    s = 0.7
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    y = dec.folded_linear(f32(x), f32(W), f32(A), f32(B), s, jnp.float32)
    Wf = W + s * A @ B
    np.testing.assert_allclose(np.asarray(y), x @ Wf, rtol=1e-5, atol=1e-5)
    gx = jax.grad(lambda x: jnp.sum(dec.folded_linear(x, f32(W), f32(A), f32(B), s,
                                                      jnp.float32) * f32(r)))(f32(x))
    np.testing.assert_allclose(np.asarray(gx), r @ Wf.T, rtol=1e-5, atol=1e-5)


def _fd_vjp(f, x, dy, eps=1e-6):
    """<dy, df/dx . e_k> for every k by central differences in float64 NumPy."""
    out = np.zeros_like(x)
    for k in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[k] = eps
        out[k] = np.sum(dy * (f(x + e) - f(x - e))) / (2 * eps)
    return out


def test_softmax_and_swiglu_custom_vjps_against_finite_differences():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    sm = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
    y, vjp = jax.vjp(dec.softmax_last, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), sm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy, jnp.float32))[0]),
                               _fd_vjp(sm, x, dy), rtol=1e-4, atol=1e-5)

    g, u = rng.normal(size=(4, 5)) * 2, rng.normal(size=(4, 5))
    silu = lambda a: a / (1 + np.exp(-a))
    y, vjp = jax.vjp(dec.swiglu, jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), silu(g) * u, rtol=1e-5, atol=1e-6)
    dyy = rng.normal(size=(4, 5))
    dg, du = vjp(jnp.asarray(dyy, jnp.float32))
    np.testing.assert_allclose(np.asarray(dg), _fd_vjp(lambda a: silu(a) * u, g, dyy),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(du), silu(g) * dyy, rtol=1e-5, atol=1e-6)


def test_probed_linears_values_input_gradient_and_per_example_gradients():
    """One GEMM for the maps sharing x; the probes' cotangents are the per-example LoRA
    gradients (explicit float64 sums over each example's tokens)."""
    rng = np.random.default_rng(2)
    R, T, I, J, r = 2, 6, 5, 2, 3
    outs, scales = (4, 3), (0.5, 2.0)
    x = rng.normal(size=(R, T, I))
    seg = np.array([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    oh = (seg[:, None, :] == np.arange(J)[None, :, None]).astype(np.float64)   # [R, J, T]
    params = [(rng.normal(size=(I, o)), rng.normal(size=(I, r)), rng.normal(size=(r, o)))
              for o in outs]
    cot = [rng.normal(size=(R, T, o)) for o in outs]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    probes = tuple((jnp.zeros((R * J, I, r)), jnp.zeros((R * J, r, o))) for o in outs)

    def loss(x, probes):
        ys = dec.probed_linears(x, tuple(tuple(f32(a) for a in p) for p in params), probes,
                                f32(oh), scales, jnp.float32)
        return sum(jnp.sum(y * f32(c)) for y, c in zip(ys, cot)), ys

    (_, ys), (gx, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f32(x), probes)
    folded = [W + s * A @ B for (W, A, B), s in zip(params, scales)]
    for y, Wf in zip(ys, folded):
        np.testing.assert_allclose(np.asarray(y), x @ Wf, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), sum(c @ Wf.T for c, Wf in zip(cot, folded)),
                               rtol=1e-5, atol=1e-4)
    for (W, A, B), s, c, (gA, gB) in zip(params, scales, cot, gp):
        for rr in range(R):
            for j in range(J):
                tok = seg[rr] == j
                xe, dye = x[rr, tok], c[rr, tok]
                np.testing.assert_allclose(np.asarray(gA[rr * J + j]), s * xe.T @ (dye @ B.T),
                                           rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(np.asarray(gB[rr * J + j]), s * (xe @ A).T @ dye,
                                           rtol=1e-5, atol=1e-4)
