"""The decoder's custom VJPs (softmax, SwiGLU) against float64 finite differences."""

import jax
import jax.numpy as jnp
import numpy as np

from layerif_jax.models import decoder as dec


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
