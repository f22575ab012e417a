"""Every model family end to end without torch: a tiny random model of each, with LoRA,
through influence (the packed engine equals the general path), pruning (the target
sparsity, finite logits) and the HF export / load round trip (its key map)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import layerif_jax as lj
from layerif_jax.applications.prune import global_sparsity, prune_model
from layerif_jax.formats import export_hf, load_model
from layerif_jax.models.config import ModelConfig
from layerif_jax.models.decoder import Decoder
from layerif_jax.models.families import FAMILIES
from conftest import random_lora_b

BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=128)
CONFIGS = {
    "llama": {}, "mistral": {"sliding_window": 5}, "qwen2": {"qkv_bias": True},
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "qwen3": {"head_dim": 12},
    "gemma2": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
               "sliding_window": 4, "query_pre_attn_scalar": 12.0,
               "attn_logit_softcap": 2.0, "final_logit_softcap": 3.0,
               "layer_types": ("sliding_attention", "full_attention", "sliding_attention")},
}


def test_every_registered_family_is_covered():
    assert set(CONFIGS) == set(FAMILIES)


def tiny(model_type):
    cfg = ModelConfig(model_type=model_type, **{**BASE, **CONFIGS[model_type]})
    model = Decoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for lin in model.layers.linears().values():   # weights well away from the 0.02 init
        lin.kernel[...] = jnp.asarray(rng.normal(0, 0.3, lin.kernel.shape), jnp.float32)
    for n in model.layers.norm_names:
        v = getattr(model.layers, n)
        v[...] = v[...] + jnp.asarray(rng.normal(0, 0.1, v.shape), jnp.float32)
    return model


def examples(rng, k):
    return [lj.Example(rng.integers(0, 61, t).astype(np.int32), np.arange(t) >= 1)
            for t in rng.integers(3, 11, k)]


@pytest.mark.parametrize("model_type", [m if m == "llama" else pytest.param(m, marks=pytest.mark.heavy)
                                        for m in CONFIGS])   # leg 2 runs llama only
def test_lora_influence_pruning_and_export(model_type, tmp_path):
    model = tiny(model_type)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 9)), jnp.int32)
    base_logits = np.asarray(model(ids))
    # the HF export loads back (the family's key map, both ways) and gives the same logits
    out = export_hf(model, tmp_path / "hf")
    again = load_model(out)
    assert again.cfg == model.cfg
    np.testing.assert_allclose(np.asarray(again(ids)), base_logits, rtol=1e-6, atol=1e-6)

    lj.apply_lora(model, lj.LoraConfig(rank=2, alpha=4), rngs=nnx.Rngs(2))
    rng = random_lora_b(model, 0.2, seed=3)
    train, val = examples(rng, 7), examples(rng, 3)
    packed = lj.layer_scores(model, train, val, mesh=None, per_val=True)
    general = lj.layer_scores(model, train, val, engine="vmap", mesh=None, per_val=True,
                              bucket_multiple=4)
    assert packed.meta["engine"] == "packed" and packed.per_example.shape == (7, 3)
    np.testing.assert_allclose(general.per_val_layers, packed.per_val_layers, rtol=2e-4,
                               atol=1e-6 * np.abs(packed.per_val_layers).max())

    lj.merge_lora(model)
    calib = np.random.default_rng(4).integers(0, 61, (4, 12)).astype(np.int32)
    prune_model(model, np.full(7 * 3, 0.5), "wanda", calib, batch_size=2)
    assert global_sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert np.isfinite(np.asarray(model(ids))).all()


def test_config_round_trip_keeps_family_fields():
    for model_type in CONFIGS:
        cfg = ModelConfig(model_type=model_type, **{**BASE, **CONFIGS[model_type]})
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, model_type


def test_gemma2_features_change_the_output():
    model = tiny("gemma2")
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 61, (1, 11)), jnp.int32)
    ref = np.asarray(model(ids))
    for change in ({"attn_logit_softcap": None}, {"final_logit_softcap": None},
                   {"layer_types": ("full_attention",) * 3}, {"query_pre_attn_scalar": None}):
        other = Decoder(dataclasses.replace(model.cfg, **change), rngs=nnx.Rngs(1))
        nnx.update(other, nnx.state(model))
        assert not np.allclose(np.asarray(other(ids)), ref, atol=1e-4), change
