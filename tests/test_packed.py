"""The packed engine's probed linear maps: values, input gradient, and per-example LoRA
gradients against explicit float64 sums over each example's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.kernels import switch
from layerif_jax.influence.engines.packed import probed_linears


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_probed_linears_values_input_gradient_and_per_example_gradients(impl):
    """One GEMM for the maps sharing x; the probes' cotangents are the per-example LoRA
    gradients (explicit float64 sums over each example's tokens), from the pure-JAX
    reference and from the Pallas kernel (interpreted)."""
    rng = np.random.default_rng(2)
    R, T, I, J, r = 2, 6, 5, 2, 3
    outs, scales = (4, 3), (0.5, 2.0)
    x = rng.normal(size=(R, T, I))
    seg = np.array([[0, 0, 0, 1, 1, -1], [0, 0, 1, 1, 1, 1]])
    params = [(rng.normal(size=(I, o)), rng.normal(size=(I, r)), rng.normal(size=(r, o)))
              for o in outs]
    cot = [rng.normal(size=(R, T, o)) for o in outs]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    probes = tuple((jnp.zeros((R * J, I, r)), jnp.zeros((R * J, r, o))) for o in outs)

    def loss(x, probes):
        ys = probed_linears(x, tuple(tuple(f32(a) for a in p) for p in params), probes,
                            jnp.asarray(seg, jnp.int32), scales, jnp.float32, J)
        return sum(jnp.sum(y * f32(c)) for y, c in zip(ys, cot)), ys

    with switch.use(impl, interpret=True):
        (_, ys), (gx, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f32(x),
                                                                                 probes)
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


@pytest.mark.parametrize("remat", [False, "mlp"])
def test_engine_scores_equal_the_dots_of_its_gradients(remat):
    """`PackedEngine.scores` (h . g_e, no gradient formed) gives what dotting the engine's
    per-example gradients with h gives, for one and for several directions, with empty
    slots scoring zero; the gradients themselves are held to float64 references elsewhere
    (test_influence)."""
    from conftest import tiny_lora_decoder
    from layerif_jax.data import Example
    from layerif_jax.influence import core
    from layerif_jax.influence.engines.packed import PackedEngine

    model, rng = tiny_lora_decoder()
    train = [Example(rng.integers(0, 64, t).astype(np.int32), np.arange(t) >= 1)
             for t in rng.integers(1, 17, 9)]
    eng = PackedEngine(model, dtype=None, mesh=None, chunk_size=4, row_len=None,
                       chunks_per_call=2, remat=remat)
    eng.plan([train])
    assert eng.direct_scores(1) and not eng.direct_scores(eng.per_row + 1)
    leaves = jax.tree.leaves(eng.params)
    for M in (1, 3):
        h = [jnp.asarray(rng.normal(size=(M, *x.shape)), jnp.float32) for x in leaves]
        for call in eng.chunks(train):
            want = np.asarray(core.dots(eng.grads(call)[0], h))
            got, finite = eng.scores(call, h)
            assert got.shape == want.shape == (len(call.index), M, 3 * len(leaves))
            assert np.asarray(finite).all()
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                                       atol=1e-5 * np.abs(want).max())
            assert not np.asarray(got)[call.index < 0].any()
