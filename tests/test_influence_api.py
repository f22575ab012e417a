"""The documented influence API on models that are not the project's: a small MLP classifier
(per-example gradients by hand, in float64 NumPy) through `influence_scores`, and a small
NNX transformer with `nnx.LoRA` layers in an `nnx.List` (per-example gradients taken one
example at a time) through `layer_scores`; and the general path on the project's Decoder
against the packed engine. No torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layerif_jax as lj
from layerif_jax.errors import LayerIFError
from layerif_jax.influence import influence_scores, layer_scores
from conftest import random_lora_b


def reference(grads_LU, val_LU, estimator, scale=0.1):
    """Per-example layer scores [n, L] in float64 from per-example gradients per (layer,
    unit) {(l, u): [n, d]} and validation gradients {(l, u): [m, d]} (METHOD.md 2)."""
    L = 1 + max(l for l, _ in grads_LU)
    n = next(iter(grads_LU.values())).shape[0]
    out = np.zeros((n, L))
    for (l, u), X in grads_LU.items():
        v = val_LU[(l, u)].mean(0)
        d = X.shape[1]
        lam = scale * np.mean(np.sum(X * X, 1)) / d
        if estimator == "identity":
            h = v
        elif estimator == "exact":
            h = np.linalg.solve(X.T @ X / n + lam * np.eye(d), v)
        else:  # datainf
            c = (X @ v) / (lam + np.sum(X * X, 1))
            h = (n * v - c @ X) / (n * lam)
        out[:, l] += X @ h
    return out


# -- (a) an MLP classifier, gradients by hand ---------------------------------------------------

def mlp_problem(seed=0, n=40, m=9, dims=(5, 6, 4)):
    rng = np.random.default_rng(seed)
    params = {"layers": [{"w": rng.normal(0, 0.6, (a, b)), "b": rng.normal(0, 0.1, b)}
                         for a, b in zip(dims[:-1], dims[1:])],
              "head": rng.normal(0, 0.6, dims[-1])}
    X = rng.normal(size=(n + m, dims[0]))
    y = (rng.uniform(size=n + m) < 0.5).astype(float)
    return params, X, y, n


def mlp_loss(p, ex):
    h = ex["x"]
    for layer in p["layers"]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    z = h @ p["head"]
    return jnp.logaddexp(0.0, z) - ex["y"] * z          # logistic loss


def mlp_grads(params, X, y):
    """Per-example gradients of every layer's w and b by backpropagation in NumPy."""
    hs = [X]
    for layer in params["layers"]:
        hs.append(np.tanh(hs[-1] @ layer["w"] + layer["b"]))
    z = hs[-1] @ params["head"]
    delta = (1 / (1 + np.exp(-z)) - y)[:, None] * params["head"][None]   # dL/dh_last
    out = {}
    for l in reversed(range(len(params["layers"]))):
        dpre = delta * (1 - hs[l + 1] ** 2)
        out[(l, 0)] = np.einsum("ni,nj->nij", hs[l], dpre).reshape(len(X), -1)   # w
        out[(l, 1)] = dpre                                                         # b
        delta = dpre @ params["layers"][l]["w"].T
    return out


@pytest.mark.parametrize("estimator", ["identity", "datainf", "exact"])
def test_mlp_against_hand_gradients(estimator):
    params, X, y, n = mlp_problem()
    g = mlp_grads(params, X, y)
    want = reference({k: v[:n] for k, v in g.items()},
                     {k: v[n:] for k, v in g.items()}, estimator)
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    data = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
    train = jax.tree.map(lambda a: a[:n], data)
    val = jax.tree.map(lambda a: a[n:], data)
    res = influence_scores(mlp_loss, f32, train, val, layer_of=r"layers\.(\d+)\.",
                           estimator=estimator, chunk_size=7, mesh=None)
    assert res.per_example.shape == (n, 2) and res.layer_ids == (0, 1)
    assert res.unit_names == ("layers.b", "layers.w")       # the head is not attributed
    np.testing.assert_allclose(res.per_example, want, rtol=2e-4, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(res.layer_scores, np.where(want > 0, want, 0).sum(0), rtol=2e-4)


def test_layer_of_forms_agree_and_budget_recomputes():
    params, X, y, n = mlp_problem(seed=1, dims=(4, 4, 4))
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    data = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
    train, val = jax.tree.map(lambda a: a[:n], data), jax.tree.map(lambda a: a[n:], data)
    by_regex = influence_scores(mlp_loss, f32, train, val, layer_of=r"layers\.(\d+)\.",
                                mesh=None)
    by_call = influence_scores(mlp_loss, f32, train, val, mesh=None, chunk_size=3,
                               memory_budget=1,   # nothing kept: recomputed twice more
                               layer_of=lambda p: int(p.split(".")[1]) if p.startswith("layers") else None)
    assert by_call.meta["kept_examples"] == 0
    # float32, different chunking: sums run in a different order; a score near zero differs by
    # ~1e-7 of the largest score (measured 2e-6 on 15 under jax 0.12), so the floor is relative
    scale = np.abs(by_regex.per_example).max()
    np.testing.assert_allclose(by_call.per_example, by_regex.per_example, rtol=1e-5, atol=1e-6 * scale)
    # the same layers stacked on a leading axis
    stacked = {"w": jnp.stack([p["w"] for p in f32["layers"]]),
               "b": jnp.stack([p["b"] for p in f32["layers"]])}

    def loss_stacked(p, ex):
        layers = [{"w": p["w"][l], "b": p["b"][l]} for l in range(2)]
        return mlp_loss({"layers": layers, "head": f32["head"]}, ex)

    st = influence_scores(loss_stacked, stacked, train, val, layer_of="stacked", mesh=None)
    np.testing.assert_allclose(st.per_example, by_regex.per_example, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(LayerIFError, match="exactly one group"):
        influence_scores(mlp_loss, f32, train, val, layer_of=r"layers\.\d+")
    with pytest.raises(LayerIFError, match="attributes no parameter"):
        influence_scores(mlp_loss, f32, train, val, layer_of=r"blocks\.(\d+)\.")
    with pytest.raises(LayerIFError, match="has no option 'tol'"):
        influence_scores(mlp_loss, f32, train, val, layer_of=r"layers\.(\d+)\.",
                         estimator_options={"tol": 1e-3})


# -- (b) a small NNX transformer with nnx.LoRA layers in an nnx.List ---------------------------

class Block(nnx.Module):
    def __init__(self, d, r, *, rngs):
        lin = lambda: nnx.LoRA(d, r, d, base_module=nnx.Linear(d, d, rngs=rngs), rngs=rngs)
        self.q, self.k, self.v, self.o, self.up = lin(), lin(), lin(), lin(), lin()
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        T = x.shape[-2]
        s = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(x.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e30)
        x = x + self.o(jax.nn.softmax(s, -1) @ v)
        return x + self.up(jax.nn.gelu(self.norm(x)))


class TinyLM(nnx.Module):
    def __init__(self, vocab=23, d=8, r=2, layers=3, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List([Block(d, r, rngs=rngs) for _ in range(layers)])
        self.out = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids_BT):
        x = self.embed(ids_BT)
        for block in self.layers:
            x = block(x)
        return self.out(x)


def tiny_lm(seed=0):
    model = TinyLM(rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    lora = nnx.state(model, nnx.LoRAParam)      # a trained adapter: B is not zero
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32), lora))
    return model


def seq_loss(model, ex):
    logits = model(ex["ids"][None])[0]
    logp = jax.nn.log_softmax(logits[:-1], -1)
    return -jnp.mean(jnp.take_along_axis(logp, ex["ids"][1:, None], -1))


def one_at_a_time(model, data):
    """{(layer, unit): [n, d]} float64 from one jax.grad per example."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    out = {}
    for i in range(data["ids"].shape[0]):
        ex = {"ids": data["ids"][i]}
        g = jax.grad(lambda p: seq_loss(nnx.merge(graphdef, p, rest), ex))(lora)
        for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            layer = int(keys[1])
            unit = ".".join(k for j, k in enumerate(keys) if j != 1 and k != "value")
            out.setdefault((layer, unit), []).append(np.asarray(x, np.float64).ravel())
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("estimator", ["datainf", "exact"])
def test_nnx_lora_transformer_against_one_example_at_a_time(estimator):
    model = tiny_lm()
    rng = np.random.default_rng(3)
    train = {"ids": jnp.asarray(rng.integers(0, 23, (13, 7)), jnp.int32)}
    val = {"ids": jnp.asarray(rng.integers(0, 23, (5, 7)), jnp.int32)}
    gt, gv = one_at_a_time(model, train), one_at_a_time(model, val)
    units = sorted({u for _, u in gt})
    ref = lambda d: {(l, units.index(u)): x for (l, u), x in d.items()}
    want = reference(ref(gt), ref(gv), estimator)
    res = layer_scores(model, train, val, loss_fn=seq_loss, estimator=estimator, chunk_size=4,
                       mesh=None)
    assert res.layer_ids == (0, 1, 2) and len(res.unit_names) == 10   # 5 maps x (A, B)
    assert res.meta["engine"] == "vmap"
    np.testing.assert_allclose(res.per_example, want, rtol=5e-4, atol=5e-6 * np.abs(want).max())


def test_nnx_model_with_tokenised_examples_and_the_default_loss():
    """Tokenised LM examples and no loss_fn: the mean token cross-entropy of model(ids) on
    right-padded length buckets equals the unpadded loss of every example."""
    model = tiny_lm(seed=1)
    rng = np.random.default_rng(4)
    ex = lambda k: [lj.Example(rng.integers(0, 23, t).astype(np.int32), np.arange(t) >= 1)
                    for t in rng.integers(4, 9, k)]
    train, val = ex(9), ex(4)
    got = layer_scores(model, train, val, mesh=None, chunk_size=3, bucket_multiple=4)
    gt, gv = one_at_a_time_examples(model, train), one_at_a_time_examples(model, val)
    units = sorted({u for _, u in gt})
    ref = lambda d: {(l, units.index(u)): x for (l, u), x in d.items()}
    want = reference(ref(gt), ref(gv), "datainf")
    np.testing.assert_allclose(got.per_example, want, rtol=5e-4, atol=5e-6 * np.abs(want).max())


def test_drawn_tokens_follow_the_models_distribution_per_example_and_position():
    """The true Fisher's labels (`draw_next_tokens`): frequencies within 4 sigma of
    softmax(logits) over 40000 draws, each draw the inverse CDF of its own uniform (a
    float64 NumPy searchsorted), and a draw does not depend on the rows beside it."""
    from layerif_jax.influence.engines.general import draw_next_tokens, example_key
    p = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = np.log(p) + 3.0
    n = 40000
    idx, pos = np.arange(n) // 8, np.arange(n) % 8
    keys = jax.vmap(lambda i: example_key(0, i))(jnp.asarray(idx))
    drawn = np.asarray(draw_next_tokens(keys, jnp.asarray(pos), jnp.tile(logits, (n, 1))))
    freq = np.bincount(drawn, minlength=5) / n
    assert (np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n)).all(), freq
    u = np.asarray(jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(
        keys[:200], jnp.asarray(pos[:200])))
    np.testing.assert_array_equal(drawn[:200], np.searchsorted(np.cumsum(p), u, side="right"))
    few = np.asarray(draw_next_tokens(keys[100:110], jnp.asarray(pos[100:110]),
                                      jnp.tile(logits, (10, 1))))
    np.testing.assert_array_equal(few, drawn[100:110])
    one = draw_next_tokens(example_key(0, 3), jnp.arange(8), jnp.tile(logits, (8, 1)))
    np.testing.assert_array_equal(np.asarray(one), drawn[24:32])


def test_default_lm_loss_takes_the_gauss_newton_curvature():
    """The default LM loss is split at the logits, so layer_scores takes
    curvature="gauss_newton" (vmap engine): exact influence per unit equals float64 NumPy
    built from J (central differences of the model's logits in each LoRA coordinate) and
    the softmax's Hessian, each example's loss the mean over its target tokens; the true
    Fisher (labels drawn from the model) runs on the same loss."""
    from jax.flatten_util import ravel_pytree

    model = tiny_lm(seed=2)
    rng = np.random.default_rng(5)
    ex = lambda k: [lj.Example(rng.integers(0, 23, t).astype(np.int32), np.arange(t) >= 1)
                    for t in rng.integers(4, 9, k)]
    train, val = ex(8), ex(3)
    lam = 0.05
    res = layer_scores(model, train, val, mesh=None, engine="vmap", estimator="exact",
                       curvature="gauss_newton", damping=lam, chunk_size=3, bucket_multiple=4)

    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    flat, unravel = ravel_pytree(lora)
    logits = jax.jit(lambda w, ids: nnx.merge(graphdef, unravel(w), rest)(ids[None])[0])
    # each coordinate's (layer, unit), in ravel_pytree's (leaf) order
    owner = []
    for path, x in jax.tree_util.tree_flatten_with_path(lora)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        unit = ".".join(k for j, k in enumerate(keys) if j != 1 and k != "value")
        owner += [(int(keys[1]), unit)] * int(np.prod(x.shape))
    owner = np.array([f"{l}|{u}" for l, u in owner])
    eps = 1e-2   # float32 logits: 1e-3 leaves 2.6e-3 of roundoff, 1e-2 4.7e-4
    E = np.eye(len(flat), dtype=np.float32) * eps

    def per_example(e):   # (g [D], H [D, D]) float64 of one example's mean token loss
        ids = jnp.asarray(e.ids)
        z = np.asarray(logits(flat, ids), np.float64)
        J = np.asarray(jax.vmap(lambda d: logits(flat + d, ids) - logits(flat - d, ids))(
            jnp.asarray(E)), np.float64) / (2 * eps)                    # [D, T, V]
        t = np.flatnonzero(e.targets[1:]) + 1                          # targets: positions
        p = np.exp(z[t - 1] - z[t - 1].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        Jt = J[:, t - 1]                                               # [D, k, V]
        g = np.einsum("dkv,kv->d", Jt, p - np.eye(23)[e.ids[t]]) / len(t)
        Hs = np.einsum("kv,vw->kvw", p, np.eye(23)) - np.einsum("kv,kw->kvw", p, p)
        return g, np.einsum("dkv,kvw,ekw->de", Jt, Hs, Jt) / len(t)

    tr = [per_example(e) for e in train]
    G = np.stack([g for g, _ in tr])
    GN = np.mean([h for _, h in tr], 0)
    v = np.mean([per_example(e)[0] for e in val], 0)
    want = np.zeros((len(train), 3))
    for key in sorted(set(owner)):
        c = owner == key
        C = GN[np.ix_(c, c)]
        want[:, int(key.split("|")[0])] += G[:, c] @ np.linalg.solve(C + lam * np.eye(len(C)),
                                                                     v[c])
    np.testing.assert_allclose(res.per_example, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    ef = layer_scores(model, train, val, mesh=None, engine="vmap", estimator="exact",
                      damping=lam, chunk_size=3, bucket_multiple=4)
    assert np.abs(ef.per_example - want).max() > 0.05 * np.abs(want).max()
    tf = layer_scores(model, train, val, mesh=None, engine="vmap", estimator="cg",
                      curvature="true_fisher", damping=lam, chunk_size=3, bucket_multiple=4)
    assert tf.meta["curvature"] == "true_fisher" and np.isfinite(tf.per_example).all()
    with pytest.raises(LayerIFError, match="layer_scores splits its own LM loss"):
        layer_scores(model, train, val, mesh=None, engine="vmap", estimator="cg",
                     curvature="gauss_newton", loss_fn=lambda m, e: jnp.sum(m(e["ids"][None])))


def one_at_a_time_examples(model, examples):
    """As `one_at_a_time`, for variable-length tokenised examples (no padding at all)."""
    out = {}
    for e in examples:
        part = one_at_a_time(model, {"ids": jnp.asarray(e.ids)[None]})
        for k, v in part.items():
            out.setdefault(k, []).append(v[0])
    return {k: np.stack(v) for k, v in out.items()}


# -- (c) the general path on the project's Decoder equals the packed engine -----------------

@pytest.mark.heavy   # leg 1 only (CI time): leg 2 runs the general path's own tests
def test_general_path_on_decoder_equals_packed():
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder
    from layerif_jax.models.lora import LoraConfig, apply_lora

    cfg = ModelConfig(model_type="llama", vocab_size=41, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=2, alpha=4))
    rng = random_lora_b(model, 0.2)
    ex = lambda k: [lj.Example(rng.integers(0, 41, t).astype(np.int32), np.arange(t) >= 1)
                    for t in rng.integers(3, 12, k)]
    train, val = ex(10), ex(4)
    packed = layer_scores(model, train, val, engine="packed", mesh=None, per_val=True)
    general = layer_scores(model, train, val, engine="vmap", mesh=None, per_val=True,
                           chunk_size=3, bucket_multiple=4)
    assert packed.meta["engine"] == "packed" and general.meta["engine"] == "vmap"
    np.testing.assert_allclose(general.per_val_layers, packed.per_val_layers, rtol=1e-4,
                               atol=1e-6 * np.abs(packed.per_val_layers).max())
