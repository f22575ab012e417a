"""segment_attention: splash attention with segment ids (interpreted on CPU, compiled for
TPU with libtpu), Triton's flash attention with segment ids for NVIDIA GPUs (interpreted
on CPU, compiled for an H200 with the JAX CUDA plugin) and the pure-JAX reference against float64 NumPy attention computed row
by row over each example's own tokens: packed layouts with padding, one-token examples,
T not a multiple of the block, grouped-query heads, a sliding window and a softcap,
float32 and bfloat16; gradients against central differences of the float64 forward."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.kernels import switch
from layerif_jax.kernels.segment_attention import segment_attention

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="TPU compiles need the libtpu wheel")
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="GPU compiles need the JAX "
                                       "CUDA plugin (pip install 'jax[cuda12-local]')")
# (impl, platform): splash, the GPU kernel, the reference; all interpreted
IMPLS = [("kernel", None), ("kernel", "cuda"), ("reference", None)]


def gpu_where_it_runs(window, cap):
    """IMPLS, less the GPU kernel where it would run the reference (a window, a softcap:
    test_the_switch_and_bad_shapes checks that it does)."""
    return [i for i in IMPLS if i[1] != "cuda" or (window is None and cap is None)]


def packed(rng, B, T):
    """Rows of consecutive examples of random lengths (some one token), padding after."""
    seg = np.full((B, T), -1, np.int32)
    for b in range(B):
        off, j = 0, 0
        while off < T - T // 6:
            n = 1 if (b, j) == (0, 1) or rng.random() < 0.2 else int(rng.integers(2, T // 3))
            seg[b, off:off + n] = j
            off, j = off + n, j + 1
    return seg


def numpy_attention(q, k, v, seg, scale, softcap=None, window=None):
    """float64, one query at a time over the keys it may see."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for t in range(T):
            sid = seg[b, t] if seg[b, t] >= 0 else -1
            keys = [s for s in range(t + 1) if (seg[b, s] if seg[b, s] >= 0 else -1) == sid
                    and (window is None or t - s < window)]
            for h in range(H):
                s = scale * k[b, keys, h // G] @ q[b, t, h]
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, h // G]
    return out


CASES = [  # B, T, H, K, D, window, softcap
    (2, 128, 4, 2, 64, None, None),
    (2, 200, 4, 1, 64, None, None),     # T padded to 256; one kv head
    (1, 256, 2, 2, 128, 24, None),      # a sliding window shorter than some examples
    (2, 130, 4, 2, 32, None, 5.0),      # softcap; T padded to 256
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_against_float64(case, dtype):
    B, T, H, K, D, window, cap = case
    rng = np.random.default_rng(T + H + D)
    seg = packed(rng, B, T)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, D)), dtype) for n in (H, K, K))
    scale = 0.7 / np.sqrt(D)
    f32 = lambda a: np.asarray(a.astype(jnp.float32))   # noqa: E731
    want = numpy_attention(f32(q), f32(k), f32(v), seg, scale, cap, window)
    # float32: softmax and sums in float32; bf16: q scaled, probabilities and output rounded
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for impl, platform in gpu_where_it_runs(window, cap):
        got = segment_attention(q, k, v, jnp.asarray(seg), scale=scale, softcap=cap,
                                window=window, impl=impl, interpret=True, platform=platform)
        assert got.shape == (B, T, H, D) and got.dtype == dtype
        np.testing.assert_allclose(f32(got), want, rtol=0, atol=tol, err_msg=f"{impl} {platform}")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]])
def test_gradients_against_central_differences(case):
    """<grad L, d> for random directions d of q, k and v against (L(x + e d) - L(x - e d))
    / 2e of the float64 forward, L = sum(o * c) over the real (non-padding) tokens."""
    B, T, H, K, D, window, cap = case
    rng = np.random.default_rng(1)
    seg = packed(rng, B, T)
    q, k, v = (rng.normal(size=(B, T, n, D)) for n in (H, K, K))
    c = rng.normal(size=(B, T, H, D)) * (seg >= 0)[..., None, None]
    scale = 1 / np.sqrt(D)
    L64 = lambda *a: float(np.sum(numpy_attention(*a, seg, scale, cap, window) * c))  # noqa
    dirs = [rng.normal(size=a.shape) for a in (q, k, v)]
    eps = 1e-4
    want = (L64(*(a + eps * d for a, d in zip((q, k, v), dirs)))
            - L64(*(a - eps * d for a, d in zip((q, k, v), dirs)))) / (2 * eps)
    f32 = lambda a: jnp.asarray(a, jnp.float32)   # noqa: E731
    for impl, platform in gpu_where_it_runs(window, cap):
        L = lambda q_, k_, v_: jnp.sum(segment_attention(   # noqa: E731
            q_, k_, v_, jnp.asarray(seg), scale=scale, softcap=cap, window=window, impl=impl,
            interpret=True, platform=platform) * f32(c))
        grads = jax.grad(L, argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
        got = sum(float(jnp.sum(g * f32(d))) for g, d in zip(grads, dirs))
        assert abs(got - want) <= 1e-4 * (abs(want) + np.sqrt(c.size)), (impl, got, want)
        # padding queries get no gradient into the real tokens' keys and values
        pad = seg < 0
        if pad.any():
            gk = np.asarray(jax.grad(lambda k_: jnp.sum(segment_attention(
                f32(q), k_, f32(v), jnp.asarray(seg), scale=scale, softcap=cap, window=window,
                impl=impl, interpret=True, platform=platform)
                * f32(pad[..., None, None])))(f32(k)))
            assert not gk[~pad].any(), impl


def test_the_switch_and_bad_shapes():
    q = jnp.ones((1, 128, 2, 64))
    kv, seg = jnp.ones((1, 128, 1, 64)), jnp.zeros((1, 128), jnp.int32)
    has = lambda **kw: "pallas_call" in str(jax.make_jaxpr(   # noqa: E731
        lambda *a: segment_attention(*a, **kw))(q, kv, kv, seg))
    assert not has() and has(platform="tpu") and has(interpret=True)
    assert not has(platform="tpu", impl="reference")
    # NVIDIA: Triton's kernel, but not for what it lacks (a window shorter than T, a softcap)
    assert has(platform="cuda", interpret=True) and not has(platform="cuda", impl="reference")
    assert has(platform="cuda", interpret=True, window=128)
    assert not has(platform="cuda", interpret=True, window=127)
    assert not has(platform="cuda", interpret=True, softcap=30.0)
    assert has(platform="tpu", window=127, softcap=30.0)
    with switch.use("kernel", interpret=True):
        assert has()
    with pytest.raises(ValueError, match="K dividing H"):
        segment_attention(q, jnp.ones((1, 128, 3, 64)), jnp.ones((1, 128, 3, 64)), seg)
    with pytest.raises(ValueError, match="window must be at least 1"):
        segment_attention(q, kv, kv, seg, window=0)


def _compiled_backward(spec: str, platform: str) -> dict[str, str]:
    """{impl: the compiled program's text} of the gradient of attention at Mistral-7B's
    attention shapes (32 query heads, 8 kv heads, head_dim 128, bf16 rows of 256 tokens),
    compiled ahead of time for one device of `spec` (no chip needed)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from layerif_jax.influence.plan import target_devices, topology
    _, devs = topology(spec)
    mesh = Mesh(np.array(devs[:1]), ("d",))
    rep = NamedSharding(mesh, P())
    B, T, H, K, D = 2, 256, 32, 8, 128
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)   # noqa: E731

    def loss(q, k, v, seg, impl):
        return jnp.sum(segment_attention(q, k, v, seg, impl=impl, platform=platform)
                       .astype(jnp.float32) ** 2)

    args = (S((B, T, H, D), jnp.bfloat16), S((B, T, K, D), jnp.bfloat16),
            S((B, T, K, D), jnp.bfloat16), S((B, T), jnp.int32))
    out = {}
    for impl in ("kernel", "reference"):
        with target_devices(mesh):   # jax >= 0.11's Triton lowering asks for the GPU's kind
            low = jax.jit(jax.grad(lambda *a: loss(*a, impl), argnums=(0, 1, 2))).lower(*args)
        out[impl] = low.compile().as_text()
    return out


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_compiles_for_tpu_forward_and_backward(chip):
    """Splash attention with segment ids compiles at Mistral-7B's attention shapes with its
    backward (its forward, dq and dkv kernels are in the program); the reference has none."""
    for impl, hlo in _compiled_backward(f"{chip}:1x1", "tpu").items():
        n = hlo.count('custom_call_target="tpu_custom_call"')
        assert (n >= 3) if impl == "kernel" else n == 0, (impl, n)   # forward, dq, dkv


@needs_cuda_plugin
def test_compiles_for_h200_forward_and_backward():
    """Triton's flash attention with segment ids compiles for an H200 (XLA:GPU with the
    JAX CUDA plugin, no GPU) at the same shapes with its backward; the reference has no
    Triton call. What the compile cannot say: how fast it runs."""
    for impl, hlo in _compiled_backward("h200", "cuda").items():
        n = hlo.count('custom_call_target="__gpu$xla.gpu.triton"')
        # forward, the backward's preprocessing and its dq / dk / dv kernel
        assert (n >= 3) if impl == "kernel" else n == 0, (impl, n)
