"""Data-parallel influence over a 4-device CPU mesh equals the single-device result."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    from layerif_jax.data import Example
    from layerif_jax.influence import layer_scores
    from layerif_jax.model.config import ModelConfig
    from layerif_jax.model.decoder import Decoder
    from layerif_jax.model.lora import LoraConfig, apply_lora
    assert jax.device_count() == 4, jax.devices()
    cfg = ModelConfig(model_type="llama", vocab_size=53, hidden_size=32, intermediate_size=48,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8))
    rng = np.random.default_rng(0)
    for lin in model.layers.linears().values():
        lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.1, lin.lora_b.shape), jnp.float32)
    ex = lambda k: [Example(rng.integers(0, 53, t).astype(np.int32), np.arange(t) >= 1)
                    for t in rng.integers(4, 17, k)]
    train, val = ex(11), ex(6)
    one = layer_scores(model, train, val, mesh=None, chunk_size=4, per_val=True)
    four = layer_scores(model, train, val, mesh="auto", chunk_size=4, per_val=True)
    four_r = layer_scores(model, train, val, mesh="auto", chunk_size=8, memory_budget=1)
    assert four.meta["devices"] == 4 and one.meta["devices"] == 1
    four_g = layer_scores(model, train, val, mesh="auto", chunk_size=1, row_len=17,
                          chunks_per_call=3, per_val=True)
    assert four_g.meta["calls"] < four_g.meta["chunks"], four_g.meta
    rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    print("REL", rel(four.per_example, one.per_example), rel(four.per_val_layers, one.per_val_layers),
          rel(four_r.per_example, one.per_example), rel(four_g.per_val_layers, one.per_val_layers))
""")


def test_four_host_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rels = [float(x) for x in out.stdout.split("REL")[1].split()]
    assert all(r < 1e-5 for r in rels), rels
