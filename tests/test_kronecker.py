"""The Kronecker-factored (LoGra) projection of per-example gradients of the FULL weights,
against the transformers torch model in float64: each example's gradient of every linear
map's weight from torch's backward, projected from both sides in NumPy, then DataInf and
the gradient dot from the formulas (`influence_reference.reference_scores`)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from layerif_jax.data import Example
from layerif_jax.errors import LayerIFError
from layerif_jax.influence import layer_scores
from layerif_jax.influence.engines.kronecker import KronEngine, kron_projections
from layerif_jax.models.config import ModelConfig
from layerif_jax.models.params import model_from_tensors

import influence_reference as ref

LAYERS, K_IN, K_OUT, SEED = 3, 5, 3, 7


def _examples(rng, count):
    return [Example(rng.integers(0, 61, t).astype(np.int32), np.arange(t) >= 1)
            for t in rng.integers(2, 19, count)]


def _torch_weight_grads(tm, examples):
    """{(map, layer): [n, d_in, d_out]} float64: each example's gradient of the weight."""
    params = dict(tm.named_parameters())
    out = {}
    for ex in examples:
        tm.zero_grad()
        ids = torch.tensor(ex.ids[None].astype(np.int64))
        labels = ids.clone()
        labels[0, ~torch.tensor(ex.targets)] = -100
        tm(input_ids=ids, labels=labels).loss.backward()
        for name in ref.MODULES:
            sub = "self_attn" if name in ref.MODULES[:4] else "mlp"
            for l in range(LAYERS):
                w = params[f"model.layers.{l}.{sub}.{name}.weight"].grad.T.numpy().copy()
                out.setdefault((name, l), []).append(w)
    return {k: np.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def setup():
    tm, tcfg = ref.tiny_torch_model("llama", layers=LAYERS)
    cfg = ModelConfig.from_hf(tcfg.to_dict())
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    model = model_from_tensors(cfg, sd.keys(), sd.__getitem__)        # no LoRA at all
    rng = np.random.default_rng(0)
    train, val = _examples(rng, 11), _examples(rng, 4)
    tm = tm.double()
    maps = {n: cfg.linear_shape(n) for n in ref.MODULES}
    P = {n: tuple(np.asarray(p, np.float64) for p in ps)
         for n, ps in kron_projections(SEED, maps, LAYERS, K_IN, K_OUT).items()}

    def projected(examples):   # reference_scores' layout: the map's unit as "A", no "B"
        out = {}
        for (name, l), G in _torch_weight_grads(tm, examples).items():
            g = np.einsum("nio,ik,oj->nkj", G, P[name][0][l], P[name][1][l])
            out[(name, "A", l)] = g.reshape(len(examples), -1)
            out[(name, "B", l)] = np.zeros((len(examples), 0))
        return out
    return model, train, val, projected(train), projected(val)


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_projected_gradients_are_torchs_projected_from_both_sides(setup):
    model, train, _, tg, _ = setup
    eng = KronEngine(model, k_in=K_IN, k_out=K_OUT, seed=SEED, dtype=None, mesh=None,
                     chunk_size=4, row_len=None, chunks_per_call=2)
    eng.plan([train])
    names = sorted(ref.MODULES)
    seen = 0
    for call in eng.chunks(train):
        g, finite = eng.grads(call)
        assert np.asarray(finite).all() and len(g) == len(names)
        for row, i in enumerate(call.index):
            if i < 0:   # an empty slot: zeros
                assert all(not np.asarray(x[row]).any() for x in g)
                continue
            seen += 1
            for name, x in zip(names, g):
                assert x.shape[1:] == (LAYERS, K_IN, K_OUT)
                for l in range(LAYERS):
                    want = tg[(name, "A", l)][i].reshape(K_IN, K_OUT)
                    np.testing.assert_allclose(np.asarray(x[row, l]), want, rtol=1e-4,
                                               atol=1e-5 * np.abs(want).max())
    assert seen == len(train)


@pytest.mark.parametrize("estimator", ["datainf", "identity"])
def test_scores_on_the_projected_weights_match_float64(setup, estimator):
    """DataInf / gradient dot on the projected full weights, one unit per map and layer,
    per validation example and against the mean validation gradient; kept and recomputed
    gradients alike."""
    model, train, val, tg, vg = setup
    want, want_pv = ref.reference_scores(tg, vg, LAYERS, estimator=estimator, unit="module")
    for budget in (None, 1):
        got = layer_scores(model, train, val, mesh=None, chunk_size=4, per_val=True,
                           estimator=estimator, projection=f"kron:{K_IN}x{K_OUT}",
                           projection_seed=SEED, memory_budget=budget)
        assert got.meta["engine"] == "packed+kronecker" and got.meta["projection"] == "kron:5x3"
        assert len(got.unit_names) == 7 and got.gradients_kept == (budget is None)
        assert _rel(got.per_example, want) < 1e-5, _rel(got.per_example, want)
        assert _rel(got.per_val_layers, want_pv) < 1e-5
    if estimator == "datainf":
        return
    # another seed draws other directions: other scores
    other = layer_scores(model, train, val, mesh=None, chunk_size=4, estimator=estimator,
                         projection=f"kron:{K_IN}x{K_OUT}", projection_seed=SEED + 1)
    assert _rel(other.per_example, want) > 1e-2


def test_refusals(setup):
    model, train, val, _, _ = setup
    for kw, msg in [(dict(projection="kron:0"), "positive integers"),
                    (dict(projection="kron:4x"), "positive integers"),
                    (dict(projection="kron:4", engine="vmap"), "needs the packed engine"),
                    (dict(projection="kron:4", estimator="ekfac"), "needs the input and output"),
                    (dict(projection=8, engine="packed"), "Gaussian projection")]:
        with pytest.raises(LayerIFError, match=msg):
            layer_scores(model, train, val, mesh=None, **kw)
