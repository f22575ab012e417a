"""The iterative and scale-free estimators against float64 NumPy on the MLP problem of
test_influence_api (per-example gradients by hand). Every parameter tensor is its own
"layer" here (layer_of by leaf), so per-example scores are per unit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.errors import LayerIFError
from layerif_jax.influence import influence_scores
from test_influence_api import mlp_grads, mlp_loss, mlp_problem

LEAVES = ["layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w"]   # flatten order
KEY = {"layers.0.w": (0, 0), "layers.0.b": (0, 1), "layers.1.w": (1, 0), "layers.1.b": (1, 1)}


def per_leaf(p):
    return LEAVES.index(p) if p in LEAVES else None


@pytest.fixture(scope="module")
def problem():
    params, X, y, n = mlp_problem(seed=2)
    g = mlp_grads(params, X, y)
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    data = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
    train, val = jax.tree.map(lambda a: a[:n], data), jax.tree.map(lambda a: a[n:], data)
    grads = [g[KEY[name]][:n] for name in LEAVES]
    vals = [g[KEY[name]][n:].mean(0) for name in LEAVES]
    return f32, train, val, grads, vals


def run(problem, estimator, **kw):
    f32, train, val, _, _ = problem
    return influence_scores(mlp_loss, f32, train, val, layer_of=per_leaf, mesh=None,
                            estimator=estimator, chunk_size=16, **kw)


def exact_unit_scores(grads, vals, scale=0.1, damping=None):
    out = []
    for X, v in zip(grads, vals):
        n, d = X.shape
        lam = damping if damping is not None else scale * np.mean(np.sum(X * X, 1)) / d
        out.append(X @ np.linalg.solve(X.T @ X / n + lam * np.eye(d), v))
    return np.stack(out, 1)


def assert_per_unit(got, want, rtol):
    for u in range(want.shape[1]):
        err = np.abs(got[:, u] - want[:, u]).max() / np.abs(want[:, u]).max()
        assert err < rtol, (LEAVES[u], err)


@pytest.mark.parametrize("damping_scale", [0.1, 1.0])
def test_cg_converges_to_exact(problem, damping_scale):
    want = exact_unit_scores(problem[3], problem[4], scale=damping_scale)
    res = run(problem, "cg", damping_scale=damping_scale,
              estimator_options={"tol": 1e-5, "max_iter": 300})
    assert res.layer_ids == (0, 1, 2, 3)
    assert_per_unit(res.per_example, want, 1e-4)
    rep = res.meta["estimator_report"]
    assert 0 < rep["iterations"] <= 300 and rep["max_relative_residual"] <= 1e-5


def test_lissa_converges_to_exact_with_the_damping_added(problem):
    want = exact_unit_scores(problem[3], problem[4], scale=1.0)
    res = run(problem, "lissa", damping_scale=1.0, estimator_options={"tol": 1e-5})
    assert_per_unit(res.per_example, want, 1e-4)
    # the flipped sign (G - lambda I)^-1 v that DataInf's LiSSA computes is far from it
    flipped = []
    for X, v in zip(problem[3], problem[4]):
        n, d = X.shape
        lam = np.mean(np.sum(X * X, 1)) / d
        flipped.append(X @ np.linalg.lstsq(X.T @ X / n - lam * np.eye(d), v, rcond=None)[0])
    assert np.abs(np.stack(flipped, 1) - want).max() > 0.1 * np.abs(want).max()
    assert res.meta["estimator_report"]["iterations"] > 1


@pytest.mark.parametrize("estimator", ["cg", "lissa"])
def test_iterative_estimators_say_when_they_do_not_converge(problem, estimator):
    with pytest.raises(LayerIFError, match=rf"{estimator} did not converge in 2 iterations: "
                                           r"relative residual .* at layer \d unit "):
        run(problem, estimator, estimator_options={"max_iter": 2, "tol": 1e-8})


@pytest.mark.parametrize("estimator", ["cg", "lissa"])
def test_iterative_estimators_need_kept_gradients(problem, estimator):
    with pytest.raises(LayerIFError, match=rf"estimator '{estimator}' takes one pass .* "
                                           r"raise the memory budget to at least \d"):
        run(problem, estimator, memory_budget=1)


def test_cosine_against_numpy(problem):
    grads, vals = problem[3], problem[4]
    want = np.stack([X @ v / (np.linalg.norm(X, axis=1) * np.linalg.norm(v))
                     for X, v in zip(grads, vals)], 1)
    assert np.abs(want).max() <= 1
    res = run(problem, "cosine")
    np.testing.assert_allclose(res.per_example, want, rtol=1e-5, atol=1e-6)


def test_unknown_option_names_the_valid_ones(problem):
    with pytest.raises(LayerIFError, match=r"estimator 'cg' has no option 'depth' \(its "
                                           r"options: max_iter, tol\)"):
        run(problem, "cg", estimator_options={"depth": 3})


@pytest.mark.parametrize("engine", ["packed", "vmap"])
def test_on_the_decoder_cg_and_lissa_equal_exact(engine):
    """On the project's decoder (stacked LoRA leaves, both engines) the iterative
    estimators give the exact estimator's scores (itself checked against float64 torch
    in test_influence.py)."""
    from layerif_jax.influence import layer_scores
    model, ex = _decoder_problem()
    train, val = ex(12), ex(4)
    kw = dict(mesh=None, engine=engine, damping_scale=1.0, chunk_size=4)
    want = layer_scores(model, train, val, estimator="exact", **kw).per_example
    for est in ("cg", "lissa"):
        got = layer_scores(model, train, val, estimator=est, **kw).per_example
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, est


def test_arnoldi_with_k_above_the_rank_is_exact(problem):
    grads, vals = problem[3], problem[4]
    want = exact_unit_scores(grads, vals)
    k = max(X.shape[1] for X in grads) + 1                 # >= rank(G_b) + 1 for every unit
    res = run(problem, "arnoldi", estimator_options={"k": k})
    assert_per_unit(res.per_example, want, 1e-4)
    top = res.meta["estimator_report"]["top_eigenvalue"]     # {"layer l unit name": value}
    assert len(top) == len(grads)
    for l, X in enumerate(grads):
        got = next(v for name, v in top.items() if name.startswith(f"layer {l} "))
        assert got == pytest.approx(np.linalg.eigvalsh(X.T @ X / len(X)).max(), rel=1e-4)


def test_arnoldi_small_k_keeps_the_top_of_the_spectrum(problem):
    """k = 4 of up to 30 directions: the scores move toward exact from the k = 1 ones."""
    grads, vals = problem[3], problem[4]
    want = exact_unit_scores(grads, vals)
    err = {k: np.abs(run(problem, "arnoldi", estimator_options={"k": k}).per_example
                     - want).max() for k in (1, 4, 12)}
    assert err[12] < err[4] < err[1]


# -- curvature: Gauss-Newton and Hessian, per unit ----------------------------------------

def numpy_curvatures(params, X, y, n):
    """Per unit (in LEAVES order), float64: Gauss-Newton (1/n) sum s(1-s) J J^T with
    J = dz/dtheta = g / (s - y), and the Hessian by central differences of the mean
    hand-written gradient."""
    g = mlp_grads(params, X[:n], y[:n])
    z_grad_scale = None
    hs = [X[:n]]
    for layer in params["layers"]:
        hs.append(np.tanh(hs[-1] @ layer["w"] + layer["b"]))
    sig = 1 / (1 + np.exp(-(hs[-1] @ params["head"])))
    z_grad_scale = sig - y[:n]
    gn, hess = [], []
    for name in LEAVES:
        Jz = g[KEY[name]] / z_grad_scale[:, None]
        gn.append((Jz * (sig * (1 - sig))[:, None]).T @ Jz / n)
        l, kind = int(name.split(".")[1]), name.split(".")[2]
        shape = params["layers"][l][kind].shape
        cols = []
        for j in range(int(np.prod(shape))):
            def mean_grad(eps):
                p = {"layers": [dict(layer) for layer in params["layers"]], "head": params["head"]}
                w = p["layers"][l][kind].copy().reshape(-1)
                w[j] += eps
                p["layers"][l][kind] = w.reshape(shape)
                return mlp_grads(p, X[:n], y[:n])[KEY[name]].mean(0)
            cols.append((mean_grad(1e-5) - mean_grad(-1e-5)) / 2e-5)
        H = np.stack(cols, 1)
        hess.append((H + H.T) / 2)
    return {"gauss_newton": gn, "hessian": hess}


@pytest.fixture(scope="module")
def curvatures():
    params, X, y, n = mlp_problem(seed=2)
    return numpy_curvatures(params, X, y, n)


def curvature_reference(grads, vals, C, damping):
    return np.stack([X @ np.linalg.solve(Cb + damping * np.eye(len(Cb)), v)
                     for X, v, Cb in zip(grads, vals, C)], 1)


def split_loss():
    from layerif_jax.influence import OutputLoss

    def output(p, ex):
        h = ex["x"]
        for layer in p["layers"]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h @ p["head"]

    return OutputLoss(output, lambda z, ex: jnp.logaddexp(0.0, z) - ex["y"] * z)


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
@pytest.mark.parametrize("estimator", ["exact", "cg", "arnoldi"])
def test_curvatures_against_numpy(problem, curvatures, curvature, estimator):
    f32, train, val, grads, vals = problem
    # the Hessian's smallest eigenvalue per unit is -0.22 here: its damping keeps
    # H + lambda I positive definite, as CG needs
    damping = 0.05 if curvature == "gauss_newton" else 0.3
    want = curvature_reference(grads, vals, curvatures[curvature], damping)
    opts = {"k": 31} if estimator == "arnoldi" else {}
    res = influence_scores(split_loss(), f32, train, val, layer_of=per_leaf, mesh=None,
                           estimator=estimator, curvature=curvature, damping=damping,
                           chunk_size=16, estimator_options=opts)
    assert res.meta["curvature"] == curvature
    assert_per_unit(res.per_example, want, 1e-4)
    # and the curvature matters: the empirical Fisher's scores differ
    ef = exact_unit_scores(grads, vals, damping=damping)
    assert np.abs(ef - want).max() > 1e-2 * np.abs(want).max()


def test_curvature_errors(problem):
    f32, train, val, _, _ = problem
    with pytest.raises(LayerIFError, match="'datainf' works with the empirical_fisher"):
        influence_scores(mlp_loss, f32, train, val, layer_of=per_leaf, mesh=None,
                         curvature="hessian")
    with pytest.raises(LayerIFError, match="unknown curvature 'fisher'"):
        influence_scores(mlp_loss, f32, train, val, layer_of=per_leaf, mesh=None,
                         estimator="cg", curvature="fisher")
    with pytest.raises(LayerIFError, match="cg: the damped curvature is not positive definite"):
        influence_scores(mlp_loss, f32, train, val, layer_of=per_leaf, mesh=None,
                         estimator="cg", curvature="hessian", damping=0.05)
    with pytest.raises(LayerIFError, match="needs the loss split at the model's output"):
        influence_scores(mlp_loss, f32, train, val, layer_of=per_leaf, mesh=None,
                         estimator="cg", curvature="gauss_newton")


def softmax_problem(n=4000, d=4, classes=3, seed=5):
    """A softmax regression whose labels are not the model's (so its empirical Fisher is
    far from its Gauss-Newton matrix), with the float64 per-example gradients and the
    Gauss-Newton matrix J^T (diag p - p p^T) J in the flat order [vec(w), b]."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W, b = rng.normal(0, 0.8, (d, classes)), rng.normal(0, 0.5, classes)
    y = rng.integers(0, classes, n)
    Z = X @ W + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    E = np.eye(classes)
    J = np.concatenate([np.einsum("na,ce->ncae", X, E).reshape(n, classes, d * classes),
                        np.broadcast_to(E, (n, classes, classes))], 2)       # dz/dtheta
    G = np.einsum("ncD,nc->nD", J, P - E[y])
    GN = np.einsum("ncD,ncC,nCE->DE", J, P[:, :, None] * E - P[:, :, None] * P[:, None], J) / n
    data = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.int32)}
    params = {"w": jnp.asarray(W, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    return params, data, G, GN


def test_true_fisher_draws_labels_from_the_model():
    """curvature="true_fisher": the empirical Fisher of gradients at labels drawn from
    the model (one per example). Its expectation is the Gauss-Newton matrix, so on 4000
    examples exact influence with it is within Monte Carlo error of the float64 NumPy
    Gauss-Newton reference, where the empirical Fisher (the data's labels) is far off;
    the draws depend on the example, not on the chunking."""
    from layerif_jax.influence import OutputLoss
    from layerif_jax.influence.engines.general import sample_label

    params, data, G, GN = softmax_problem()
    val = jax.tree.map(lambda x: x[:200], data)
    v = G[:200].mean(0)
    lam = 0.05
    want = G @ np.linalg.solve(GN + lam * np.eye(len(GN)), v)
    ef = G @ np.linalg.solve(G.T @ G / len(G) + lam * np.eye(len(GN)), v)
    loss = OutputLoss(lambda p, ex: ex["x"] @ p["w"] + p["b"],
                      lambda z, ex: jax.nn.logsumexp(z) - z[ex["y"]], sample_label("y"))
    kw = dict(layer_of=lambda path: 0, unit="block", estimator="exact", damping=lam, mesh=None)
    tf = influence_scores(loss, params, data, val, curvature="true_fisher", chunk_size=512, **kw)
    rel = lambda a: np.abs(a - want).max() / np.abs(want).max()   # noqa: E731
    assert tf.meta["curvature"] == "true_fisher"
    assert rel(tf.per_example[:, 0]) < 0.15, rel(tf.per_example[:, 0])   # 0.03-0.07 by seed
    assert rel(ef) > 0.3, rel(ef)
    # the same draws in another chunking (keys folded from the example's index)
    again = influence_scores(loss, params, data, val, curvature="true_fisher", chunk_size=300,
                             **kw)
    np.testing.assert_allclose(again.per_example, tf.per_example, rtol=1e-4, atol=1e-6)
    with pytest.raises(LayerIFError, match="'true_fisher' draws labels from the model"):
        influence_scores(loss._replace(sample=None), params, data, val,
                         curvature="true_fisher", **kw)


def test_several_estimators_share_one_set_of_gradients(problem):
    """estimator=[...] gives each estimator's own result from one pass of gradients."""
    many = run(problem, ["datainf", "cg", "identity"], damping_scale=1.0,
               estimator_options={"cg": {"tol": 1e-6}})
    assert list(many) == ["datainf", "cg", "identity"]
    for name, res in many.items():
        alone = run(problem, name, damping_scale=1.0,
                    estimator_options={"tol": 1e-6} if name == "cg" else None)
        assert res.estimator == name
        np.testing.assert_allclose(res.per_example, alone.per_example, rtol=1e-5,
                                   atol=1e-6 * np.abs(alone.per_example).max())
    assert many["cg"].meta["phase_seconds"]["train"] == many["datainf"].meta["phase_seconds"]["train"]
    with pytest.raises(LayerIFError, match="not among the estimators"):
        run(problem, ["datainf", "cg"], estimator_options={"lissa": {}})
    with pytest.raises(LayerIFError, match="several distinct names"):
        run(problem, ["cg", "cg"])


# -- random projection ---------------------------------------------------------------------

def test_projection_keeps_inner_products(problem):
    """TRAK-style JL: with k = 4096 directions per unit the projected gradient dot is the
    plain one up to the expected 1/sqrt(k) error; the same seed gives the same scores."""
    grads, vals = problem[3], problem[4]
    want = np.stack([X @ v for X, v in zip(grads, vals)], 1)          # identity, per unit
    got = run(problem, "identity", projection=4096)
    assert got.per_example.shape == want.shape and got.meta["projection"] == 4096
    assert np.abs(got.per_example - want).max() < 0.05 * np.abs(want).max()
    assert np.corrcoef(got.per_example.ravel(), want.ravel())[0, 1] > 0.998
    again = run(problem, "identity", projection=4096)
    np.testing.assert_array_equal(again.per_example, got.per_example)
    other = run(problem, "identity", projection=4096, projection_seed=1)
    assert not np.array_equal(other.per_example, got.per_example)
    # few directions: still an unbiased but noisier estimate
    small = run(problem, "identity", projection=8)
    assert np.abs(small.per_example - want).max() > np.abs(got.per_example - want).max()


def test_projected_exact_is_exact_on_the_projected_gradients(problem):
    """The estimators see only R^T g: exact in the projected space equals float64 exact on
    the hand-written gradients projected by the same R (recovered by projecting unit
    vectors through the engine's own jitted map)."""
    from layerif_jax.influence.engines.projected import _project

    k, lam = 12, 0.05
    res = run(problem, "exact", projection=k, damping=lam, per_val=True)
    dims = [X.shape[1] for X in problem[3]]
    groups = tuple(((j, 0),) for j in range(len(dims)))       # one piece per unit, in order
    basis = tuple(jnp.eye(d, dtype=jnp.float32)[:, None, :] for d in dims)
    R = [np.asarray(p, np.float64)[:, 0] for p in _project(basis, groups, k, 0)]  # [d, k]
    params, X, y, n = mlp_problem(seed=2)
    g = mlp_grads(params, X, y)
    want = np.zeros((n, len(LEAVES)))
    for u, name in enumerate(LEAVES):
        G, V = g[KEY[name]][:n] @ R[u], g[KEY[name]][n:] @ R[u]   # [n, k], [m, k]
        want[:, u] = (G @ np.linalg.solve(G.T @ G / n + lam * np.eye(k), V.T)).mean(1)
    assert_per_unit(res.per_example, want, 1e-4)


def test_projection_errors(problem):
    with pytest.raises(LayerIFError, match="projection must be an integer >= 1"):
        run(problem, "identity", projection=0)
    with pytest.raises(LayerIFError, match="projection goes with the empirical Fisher"):
        run(problem, "exact", projection=8, curvature="hessian")


def test_projection_on_the_full_weights_of_a_model_without_lora():
    """The decoder's blocks' full weights (no LoRA) through the general path, projected:
    the gradient dot keeps its structure (Pearson 0.98 at k = 2048, measured 2026-12-02)
    and DataInf runs on the projected gradients."""
    from flax import nnx

    import layerif_jax as lj
    from layerif_jax.influence import layer_scores
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder

    cfg = ModelConfig(model_type="llama", vocab_size=41, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ex = lambda k: [lj.Example(rng.integers(0, 41, t).astype(np.int32), np.arange(t) >= 1)  # noqa: E731
                    for t in rng.integers(3, 12, k)]
    train, val = ex(10), ex(3)
    kw = dict(params=nnx.All(nnx.Param, nnx.PathContains("layers")), layer_of="stacked",
              engine="vmap", mesh=None)
    full = layer_scores(model, train, val, estimator="identity", **kw)
    assert "layers.q_proj.kernel" in full.unit_names
    proj = layer_scores(model, train, val, estimator="identity", projection=2048, **kw)
    assert proj.per_example.shape == full.per_example.shape == (10, 2)
    assert np.corrcoef(proj.per_example.ravel(), full.per_example.ravel())[0, 1] > 0.95
    d = layer_scores(model, train, val, estimator="datainf", projection=256, **kw)
    assert np.isfinite(d.per_example).all() and d.meta["engine"] == "vmap+projection"
    with pytest.raises(LayerIFError, match=r"Gaussian projection \(an integer k\) needs engine='vmap'"):
        layer_scores(model, train, val, projection=8, engine="packed")


def test_damping_conventions(problem, curvatures):
    """adaptive (DataInf's 0.1 mean ||g||^2 / d) = 0.1 x the empirical Fisher's mean
    eigenvalue; "mean_eigenvalue" with the Gauss-Newton takes 0.1 x tr(GN_b) / d_b
    (Hutchinson, 64 probes: within 30% here) and a number is used as given."""
    f32, train, val, grads, vals = problem
    ad = run(problem, "exact")
    me = run(problem, "exact", damping="mean_eigenvalue")
    np.testing.assert_allclose(me.lambdas, ad.lambdas, rtol=1e-6)
    present = ad.lambdas[ad.lambdas != 1.0]   # absent (layer, unit) pairs hold 1
    want = [0.1 * np.trace(X.T @ X / len(X)) / X.shape[1] for X in grads]
    np.testing.assert_allclose(sorted(present), sorted(want), rtol=1e-5)
    gn = influence_scores(split_loss(), f32, train, val, layer_of=per_leaf, mesh=None,
                          estimator="exact", curvature="gauss_newton",
                          damping="mean_eigenvalue", chunk_size=16)
    lam = {name: v for name, v in zip(LEAVES, [gn.lambdas[l][
        [u for u in range(gn.lambdas.shape[1]) if gn.lambdas[l, u] != 1.0][0]] for l in range(4)])}
    for name, C in zip(LEAVES, curvatures["gauss_newton"]):
        assert lam[name] == pytest.approx(0.1 * np.trace(C) / len(C), rel=0.3), name
    assert gn.meta["hutchinson_probes"] == 64
    fixed = run(problem, "exact", damping=0.2)
    assert np.all((fixed.lambdas == 0.2) | (fixed.lambdas == 1.0))
    with pytest.raises(LayerIFError, match="one of adaptive, mean_eigenvalue"):
        run(problem, "exact", damping="huge")


# -- K-FAC and EK-FAC ----------------------------------------------------------------------

def _kronecker_context(distort: bool, seed=0, P=2, a=4, b=3, lam=0.05):
    """A Context whose per-example gradients are exactly Kronecker-structured: g = x y^T
    over every pair (x, y) of two sets, so the empirical Fisher of each piece IS
    kron(mean x x^T, mean y y^T). `distort` squares the factors' eigenvalues (same
    eigenvectors): K-FAC is then off, EK-FAC (which corrects them) is not."""
    from layerif_jax.influence import core
    from layerif_jax.influence.estimators import Context
    from layerif_jax.influence.partition import make_partition

    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(P, 5, a)), rng.normal(size=(P, 6, b))
    g = np.einsum("pia,pjb->ijpab", X, Y).reshape(30, P, a, b)
    left = np.einsum("pia,pic->pac", X, X) / 5
    right = np.einsum("pjb,pjd->pbd", Y, Y) / 6
    if distort:
        left, right = left @ left, right @ right
    part = make_partition({"w": np.zeros((P, a, b))}, layer_of="stacked")
    onehot = jnp.asarray(part.onehot())
    G = [jnp.asarray(g, jnp.float32)]
    v = [jnp.asarray(rng.normal(size=(1, P, a, b)), jnp.float32)]
    ctx = Context(part=part, n=30, v=v, sq_u=core.to_units(core.sq_norms(G), onehot),
                  vg_u=core.to_units(core.dots(G, v), onehot),
                  lam=jnp.full((P, 1), lam, jnp.float32), chunks=lambda: iter([(slice(0, 30), G)]),
                  kept=True, factors=lambda: [(left, right)])
    want = np.stack([np.linalg.solve(np.einsum("nd,ne->de", gp, gp) / 30 + lam * np.eye(a * b),
                                     np.asarray(v[0][0, p], np.float64).ravel())
                     for p, gp in enumerate(np.moveaxis(g.reshape(30, P, -1), 1, 0))])
    return ctx, want.reshape(1, P, a, b)


@pytest.mark.parametrize("distort", [False, True])
def test_ekfac_is_exact_on_kronecker_structured_gradients(distort):
    from layerif_jax.influence import get_estimator
    ctx, want = _kronecker_context(distort)
    got = np.asarray(get_estimator("ekfac").precondition(ctx)[0], np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    ctx, _ = _kronecker_context(distort)
    kfac = np.asarray(get_estimator("kfac").precondition(ctx)[0], np.float64)
    err = np.abs(kfac - want).max() / np.abs(want).max()
    assert (err > 0.1) if distort else (err < 1e-4), err


def test_kfac_needs_the_packed_engine(problem):
    with pytest.raises(LayerIFError, match="packed engine"):
        run(problem, "kfac")


def _decoder_problem(seed=0):
    from flax import nnx

    import layerif_jax as lj
    from conftest import random_lora_b
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder
    from layerif_jax.models.lora import LoraConfig, apply_lora

    cfg = ModelConfig(model_type="llama", vocab_size=41, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=2, alpha=4))
    rng = random_lora_b(model, 0.2)
    ex = lambda k: [lj.Example(rng.integers(0, 41, t).astype(np.int32), np.arange(t) >= 1)  # noqa: E731
                    for t in rng.integers(3, 12, k)]
    return model, ex


def test_ekfac_factors_are_saved_and_reused_for_another_validation_set(tmp_path):
    from layerif_jax.influence import layer_scores
    model, ex = _decoder_problem()
    train, val, val2 = ex(12), ex(4), ex(5)
    kw = dict(mesh=None, engine="packed", chunk_size=4, estimator="ekfac")
    where = {"factors_dir": str(tmp_path / "f")}
    first = layer_scores(model, train, val, estimator_options=where, **kw)
    assert first.meta["estimator_report"]["factors_saved_to"] == where["factors_dir"]
    again = layer_scores(model, train, val2, estimator_options=where, **kw)
    assert again.meta["estimator_report"]["factors_reused_from"] == where["factors_dir"]
    fresh = layer_scores(model, train, val2, **kw)
    np.testing.assert_allclose(again.per_example, fresh.per_example, rtol=1e-5, atol=1e-8)
    with pytest.raises(LayerIFError, match="factors of another run .*training gradients"):
        layer_scores(model, ex(12), val, estimator_options=where, **kw)
    with pytest.raises(LayerIFError, match="factors of another run .*estimator"):
        layer_scores(model, train, val, estimator_options=where, **{**kw, "estimator": "kfac"})
    with pytest.raises(LayerIFError, match="factors of another run .*curvature"):
        layer_scores(model, train, val, estimator_options=where, curvature="true_fisher", **kw)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(LayerIFError, match="no complete saved factors"):
        layer_scores(model, train, val, estimator_options={"factors_dir": str(tmp_path / "mine")},
                     **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_ihvp_error_against_exact_is_reported_per_unit(problem):
    """With exact among the estimators every other one reports how far its h_b is from
    exact's (H_b + lambda_b I)^-1 v_b, per unit; checked against float64 NumPy for plain
    gradient dot (h = v) and DataInf's closed form."""
    _, _, _, grads, vals = problem
    many = run(problem, ["identity", "datainf", "cg", "exact", "cosine"], damping_scale=1.0,
               estimator_options={"cg": {"tol": 1e-6}})
    assert list(many) == ["identity", "datainf", "cg", "exact", "cosine"]
    want = {"identity": [], "datainf": []}
    cosine = {"identity": [], "datainf": []}
    for X, v in zip(grads, vals):
        n, d = X.shape
        lam = 1.0 * np.mean(np.sum(X * X, 1)) / d
        h = np.linalg.solve(X.T @ X / n + lam * np.eye(d), v)
        coef = (X @ v) / (lam + np.sum(X * X, 1))
        datainf = (v - X.T @ coef / n) / lam
        for name, got in (("identity", v), ("datainf", datainf)):
            want[name].append(np.linalg.norm(got - h) / np.linalg.norm(h))
            cosine[name].append(got @ h / np.linalg.norm(got) / np.linalg.norm(h))
    for name, w in want.items():
        err = many[name].meta["ihvp_error_vs_exact"]
        per_unit = err["per_unit"]     # [L][U]: every leaf its own layer (and unit) here
        got = [per_unit[k][k] for k in range(len(LEAVES))]
        assert all(x is None for k, r in enumerate(per_unit) for u, x in enumerate(r)
                   if u != k)
        np.testing.assert_allclose(got, w, rtol=1e-3)
        assert err["max"] == pytest.approx(max(w), rel=1e-3)
        assert err["cosine_min"] == pytest.approx(min(cosine[name]), rel=1e-3)
        assert err["cosine_median"] == pytest.approx(np.median(cosine[name]), rel=1e-3)
        assert min(w) > 1e-3      # neither is exact here
    assert many["cg"].meta["ihvp_error_vs_exact"]["max"] < 1e-4
    assert "ihvp_error_vs_exact" not in many["exact"].meta       # the reference itself
    assert "ihvp_error_vs_exact" not in many["cosine"].meta      # scale-free: no IHVP
    assert "ihvp_error_vs_exact" not in run(problem, "datainf").meta


def test_one_failing_estimator_of_several_leaves_the_others_results(problem):
    """LiSSA stopped after 2 iterations fails; exact and DataInf run on the same gradients
    anyway and come back on the error, equal to their results alone."""
    from layerif_jax.errors import EstimatorsFailed
    with pytest.raises(EstimatorsFailed, match=r"lissa did not converge in 2 iterations.*\("
                                               r"the results of exact, datainf are") as err:
        run(problem, ["lissa", "exact", "datainf"],
            estimator_options={"lissa": {"max_iter": 2, "tol": 1e-8}})
    assert set(err.value.results) == {"exact", "datainf"}
    assert set(err.value.failures) == {"lissa"}
    assert_per_unit(err.value.results["exact"].per_example,
                    exact_unit_scores(problem[3], problem[4]), 1e-4)
    alone = run(problem, "datainf")
    np.testing.assert_allclose(err.value.results["datainf"].per_example, alone.per_example,
                               rtol=1e-6)
