"""Layer-wise influence against an independent float64 reference (torch + peft + NumPy)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from layerif_jax.data import Example
from layerif_jax.errors import LayerIFError
from layerif_jax.influence import layer_scores
from layerif_jax.models.config import ModelConfig
from layerif_jax.models.lora import LoraConfig, apply_lora
from layerif_jax.models.params import model_from_tensors

import influence_reference as ref

RANK, ALPHA, LAYERS = 4, 8.0, 3


def _examples(rng, count, vocab=61, lo=5, hi=19):
    out = []
    for _ in range(count):
        t = int(rng.integers(lo, hi))
        out.append(Example(rng.integers(0, vocab, t).astype(np.int32), np.arange(t) >= 1))
    return out


@pytest.fixture(scope="module")
def setup():
    tm, tcfg = ref.tiny_torch_model("llama", layers=LAYERS)
    cfg = ModelConfig.from_hf(tcfg.to_dict())
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    model = model_from_tensors(cfg, sd.keys(), sd.__getitem__)
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA))
    dims = {n: cfg.linear_shape(n) for n in ref.MODULES}
    lora = ref.random_lora(dims, LAYERS, rank=RANK)
    for name, (A, B) in lora.items():
        lin = model.layers.linears()[name]
        lin.lora_a[...] = jnp.asarray(A, jnp.float32)
        lin.lora_b[...] = jnp.asarray(B, jnp.float32)
    rng = np.random.default_rng(0)
    train, val = _examples(rng, 13), _examples(rng, 5)
    pm = ref.peft_model(tm.double(), lora, RANK, ALPHA)
    tg = ref.torch_per_example_grads(pm, train, list(lora), LAYERS)
    vg = ref.torch_per_example_grads(pm, val, list(lora), LAYERS)
    return model, train, val, tg, vg


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("engine", ["packed", "vmap"])
@pytest.mark.parametrize("estimator", ["datainf", "identity", "exact"])
@pytest.mark.parametrize("unit", ["tensor", "module", "block"])
def test_matches_float64_reference(setup, estimator, unit, engine):
    model, train, val, tg, vg = setup
    if estimator == "exact" and unit == "block":
        pytest.skip("covered by tensor/module; block units are the largest")
    if engine == "vmap" and unit != "tensor":
        pytest.skip("the engines differ only in how gradients are made: one unit suffices")
    want, want_pv = ref.reference_scores(tg, vg, LAYERS, estimator=estimator, unit=unit)
    # The exact solve amplifies the float32 rounding of the gradients by the condition
    # number of (G + lambda I); module units (d = 336 > n = 13) sit near 1e-5.
    tol = 3e-5 if (estimator, unit) == ("exact", "module") else 1e-5
    got = layer_scores(model, train, val, estimator=estimator, unit=unit, per_val=True,
                       chunk_size=4, mesh=None, engine=engine)
    assert got.per_example.shape == (13, LAYERS)
    assert _rel(got.per_example, want) < tol, _rel(got.per_example, want)
    assert _rel(got.per_val_layers, want_pv) < tol, _rel(got.per_val_layers, want_pv)
    # mean-validation mode (no per_val) gives the same per-example scores
    got1 = layer_scores(model, train, val, estimator=estimator, unit=unit, chunk_size=5, mesh=None,
                        engine=engine)
    assert _rel(got1.per_example, want) < tol


def test_layer_score_aggregates(setup):
    model, train, val, tg, vg = setup
    want, _ = ref.reference_scores(tg, vg, LAYERS)
    got = layer_scores(model, train, val, mesh=None)
    pos = np.where(want > 0, want, 0)
    np.testing.assert_allclose(got.layer_scores, pos.sum(0), rtol=1e-5)
    np.testing.assert_allclose(got.aggregated("all"), want.sum(0), rtol=1e-4, atol=1e-6 * np.abs(want).max())
    for l in range(LAYERS):
        p = np.sort(want[:, l][want[:, l] > 0])[::-1]
        k = int(np.ceil(len(p) / 4))
        np.testing.assert_allclose(got.aggregated("top25")[l], p[:k].sum(), rtol=1e-5)


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_invariant_to_chunks_budget_and_buckets(setup):
    model, train, val, _, _ = setup
    base = layer_scores(model, train, val, chunk_size=13, mesh=None, engine="vmap", bucket_multiple=64)
    # (ungrouped calls, chunks_per_call=1: test_budget_between_none_and_all_keeps_part)
    for kw in [dict(chunk_size=3, memory_budget=1),   # recompute passes
               dict(chunk_size=1, chunks_per_call=3),
               dict(chunk_size=6, row_len=40), dict(chunk_size=2, memory_budget="1KB", per_val=True),
               dict(engine="vmap", chunk_size=6, bucket_multiple=4),
               dict(engine="vmap", chunk_size=3, memory_budget=1)]:
        got = layer_scores(model, train, val, mesh=None, **kw)
        assert got.gradients_kept == (kw.get("memory_budget") is None)
        if kw.get("chunks_per_call", 4) > 1 and kw.get("engine") != "vmap":
            assert got.meta["calls"] < got.meta["chunks"], got.meta   # chunks were grouped
        assert _rel(got.per_example, base.per_example) < 1e-5, kw


@pytest.mark.parametrize("engine", ["packed", "vmap"])
def test_budget_between_none_and_all_keeps_part(setup, engine):
    model, train, val, tg, vg = setup
    want, _ = ref.reference_scores(tg, vg, LAYERS)
    full = layer_scores(model, train, val, mesh=None, chunk_size=2, chunks_per_call=1,
                        engine=engine)
    need = full.meta["needed_bytes"]
    assert full.gradients_kept and full.meta["materialised_bytes"] == need
    got = layer_scores(model, train, val, mesh=None, chunk_size=2, chunks_per_call=1,
                       engine=engine, memory_budget=need // 2)
    assert not got.gradients_kept
    assert 0 < got.meta["materialised_bytes"] <= need // 2
    assert 0 < got.meta["kept_examples"] < len(train)
    assert 0 < got.meta["recomputed_calls"] < got.meta["calls"]
    # the recomputed calls' scores: the packed engine's h . g_e with no gradient formed
    assert got.meta["direct_score_calls"] == (got.meta["recomputed_calls"]
                                              if engine == "packed" else 0)
    assert _rel(got.per_example, want) < 1e-5
    assert _rel(got.per_example, full.per_example) < 1e-5


def test_fixed_damping(setup):
    model, train, val, tg, vg = setup
    want, _ = ref.reference_scores(tg, vg, LAYERS, damping=0.05)
    got = layer_scores(model, train, val, damping=0.05, mesh=None)
    assert _rel(got.per_example, want) < 1e-5, _rel(got.per_example, want)


def test_duplicate_of_validation_set_is_beneficial(setup):
    model, train, val, _, _ = setup
    dup = Example(val[0].ids.copy(), val[0].targets.copy())
    got = layer_scores(model, list(train) + [dup], val[:1], mesh=None)
    scores = got.per_example
    # the duplicate is the most beneficial example overall and positive in every layer
    assert np.argmax(scores.sum(1)) == len(train)
    assert np.all(scores[-1] > 0)


def test_fresh_lora_is_refused():
    tm, tcfg = ref.tiny_torch_model("llama", layers=2)
    cfg = ModelConfig.from_hf(tcfg.to_dict())
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    model = apply_lora(model_from_tensors(cfg, sd.keys(), sd.__getitem__), LoraConfig(rank=2))
    ex = _examples(np.random.default_rng(1), 3)
    with pytest.raises(LayerIFError, match="freshly initialised"):
        layer_scores(model, ex, ex, mesh=None)


def test_zero_gradient_unit_and_nonfinite(setup):
    model, train, val, _, _ = setup
    lin = model.layers.linears()["v_proj"]
    old_a, old_b = lin.lora_a[...], lin.lora_b[...]
    try:
        lin.lora_a[...] = jnp.zeros_like(old_a)
        lin.lora_b[...] = jnp.zeros_like(old_b)   # A=B=0: both gradients vanish
        with pytest.raises(LayerIFError, match="v_proj.lora_a"):
            layer_scores(model, train, val, mesh=None)
        got = layer_scores(model, train, val, mesh=None, skip_zero_units=True)
        assert np.all(np.isfinite(got.per_example))
        lin.lora_a[...] = old_a
        lin.lora_b[...] = old_b.at[1, 0, 0].set(jnp.nan)
        with pytest.raises(LayerIFError, match=r"NaN or inf .* validation example\(s\) \[0, 1, 2, 3, 4\]"):
            layer_scores(model, train, val, mesh=None)
    finally:
        lin.lora_a[...] = old_a
        lin.lora_b[...] = old_b


def test_bad_arguments(setup):
    model, train, val, _, _ = setup
    for kw, msg in [(dict(estimator="lissa2"), "unknown estimator"), (dict(aggregate="top10"), "unknown aggregate"),
                    (dict(unit="row"), "unknown unit"), (dict(damping=-1.0), "damping"),
                    (dict(memory_budget="lots"), "memory budget"),
                    (dict(mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                                 ("data", "model"))), "1-D mesh")]:
        with pytest.raises(LayerIFError, match=msg):
            layer_scores(model, train, val, **{"mesh": None, **kw})


def test_bfloat16_compute_against_float64(setup):
    """bfloat16 forward/backward (float32 sums) against the float64 torch + peft reference.
    Measured (2026-12-02, jax 0.10.2, CPU; `python -m pytest tests/test_influence.py -k
    bfloat16`): max|diff| / max|score| 0.018 (packed) and 0.036 (vmap), Pearson 0.99987 /
    0.99976, layer scores within 1.0% / 1.3% of the largest, every sign right; float32
    gives 1e-6. The bounds sit at about 1.5-3x those values."""
    model, train, val, tg, vg = setup
    want, _ = ref.reference_scores(tg, vg, LAYERS)
    want_layers = np.where(want > 0, want, 0).sum(0)
    for engine in ("packed", "vmap"):
        got = layer_scores(model, train, val, mesh=None, chunk_size=4, engine=engine,
                           dtype=jnp.bfloat16)
        assert got.meta["dtype"] == "bfloat16"
        assert _rel(got.per_example, want) < 0.05, (engine, _rel(got.per_example, want))
        assert np.corrcoef(got.per_example.ravel(), want.ravel())[0, 1] > 0.999, engine
        assert _rel(got.layer_scores, want_layers) < 0.03, engine
        big = np.abs(want) > 0.01 * np.abs(want).max()
        assert (np.sign(got.per_example) == np.sign(want))[big].all(), engine


@pytest.fixture(scope="module")
def torch_factors(setup):
    model, train, val, tg, vg = setup
    tm, _ = ref.tiny_torch_model("llama", layers=LAYERS)
    dims = {n: model.cfg.linear_shape(n) for n in ref.MODULES}
    pm = ref.peft_model(tm.double(), ref.random_lora(dims, LAYERS, rank=RANK), RANK, ALPHA)
    return ref.torch_kfac_factors(pm, train, ref.MODULES, LAYERS)


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_kfac_and_ekfac_match_float64_reference(setup, torch_factors, estimator):
    """The packed engine's Kronecker factors (one forward and backward over packed rows)
    and the estimators built on them against torch hooks on peft's LoRA modules and
    explicit Kronecker matrices in NumPy."""
    model, train, val, tg, vg = setup
    want = ref.kfac_reference_scores(tg, vg, torch_factors, LAYERS, ekfac=estimator == "ekfac")
    got = layer_scores(model, train, val, estimator=estimator, mesh=None, engine="packed",
                       chunk_size=4)
    assert _rel(got.per_example, want) < 1e-4, _rel(got.per_example, want)
    # not DataInf or exact under another name: those differ from it
    other = ref.reference_scores(tg, vg, LAYERS, estimator="exact")[0]
    assert _rel(other, want) > 1e-2


@pytest.mark.parametrize("estimator", ["kfac", "ekfac"])
def test_kfac_and_ekfac_with_the_true_fisher_match_float64_reference(setup, estimator):
    """curvature="true_fisher" on the packed engine: the factors (and EK-FAC's corrected
    eigenvalues) from gradients at labels drawn from the model, against torch hooks on
    peft with the same draws made in float64 from the torch model's logits; the scores
    still dot with the training labels' gradients. Chunking does not change the draws."""
    from layerif_jax.influence.engines.general import TRUE_FISHER_SEED, example_key
    model, train, val, tg, vg = setup
    tm, _ = ref.tiny_torch_model("llama", layers=LAYERS)
    dims = {n: model.cfg.linear_shape(n) for n in ref.MODULES}
    pm = ref.peft_model(tm.double(), ref.random_lora(dims, LAYERS, rank=RANK), RANK, ALPHA)
    uniforms = lambda i, t: float(jax.random.uniform(   # noqa: E731
        jax.random.fold_in(example_key(TRUE_FISHER_SEED, i), t)))
    drawn = ref.drawn_next_tokens(pm, train, uniforms)
    assert any((d != ex.ids[1:]).any() for d, ex in zip(drawn, train))   # not the data's
    factors = ref.torch_kfac_factors(pm, train, ref.MODULES, LAYERS, labels=drawn)
    fisher_g = ref.torch_per_example_grads(pm, train, ref.MODULES, LAYERS, labels=drawn)
    want = ref.kfac_reference_scores(tg, vg, factors, LAYERS, ekfac=estimator == "ekfac",
                                     fisher_g=fisher_g)
    for chunk_size in (4, 7):
        got = layer_scores(model, train, val, estimator=estimator, mesh=None, engine="packed",
                           chunk_size=chunk_size, curvature="true_fisher")
        assert _rel(got.per_example, want) < 1e-4, (chunk_size, _rel(got.per_example, want))
        assert "true_fisher" in got.meta["phase_seconds"]
    empirical = ref.kfac_reference_scores(tg, vg, ref.torch_kfac_factors(
        pm, train, ref.MODULES, LAYERS), LAYERS, ekfac=estimator == "ekfac")
    assert _rel(empirical, want) > 1e-2   # the curvature matters here


def test_the_true_fisher_on_the_packed_engine_is_for_kfac_only(setup):
    model, train, val, _, _ = setup
    for kw, msg in ((dict(estimator="cg"), "needs engine='vmap'"),
                    (dict(estimator=["kfac", "cg"]), "needs engine='vmap'"),
                    (dict(estimator="kfac", curvature="gauss_newton"),
                     "kfac' works with the empirical_fisher / true_fisher curvature only"),
                    (dict(estimator="kfac", engine="vmap"), "which the packed engine measures")):
        with pytest.raises(LayerIFError, match=msg):
            layer_scores(model, train, val, mesh=None,
                         **{"curvature": "true_fisher", "engine": "packed", **kw})
