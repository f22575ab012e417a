"""The decoder with the attention kernel (`kernels.segment_attention`: splash attention
with segment ids, and Triton's flash attention traced for an NVIDIA GPU, both
interpreted on CPU) equals the decoder with its dense masked attention:
logits of padded and packed rows for every family (sliding windows, per-layer windows
and a softcap), the packed engine's per-example gradients, and the LayerIF scores
end to end; sharded presets run it in a shard_map."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.kernels import switch
import layerif_jax as lj
from conftest import tiny_lora_decoder
from layerif_jax.models.decoder import AttentionMask, attention_masks
from layerif_jax.ops import compiling_for
from test_families import CONFIGS, tiny


def packed_rows(rng, B, T, vocab):
    seg = np.full((B, T), -1, np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        off, j = 0, 0
        while off < T - 3:
            n = int(rng.integers(1, 9))
            seg[b, off:off + n], pos[b, off:off + n] = j, np.arange(min(n, T - off))
            off, j = off + n, j + 1
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_logits_with_the_kernel_equal_the_dense_path(model_type):
    model = tiny(model_type)
    rng = np.random.default_rng(3)
    ids, seg, pos = packed_rows(rng, 2, 40, model.cfg.vocab_size)
    real = np.asarray(seg) >= 0
    mask = jnp.asarray(np.arange(40)[None] < np.array([[33], [40]]))   # right padding
    want_packed = np.asarray(model(ids, seg >= 0, positions_BT=pos, segments_BT=seg))
    want_padded = np.asarray(model(ids, mask))
    assert attention_masks(model.cfg, seg >= 0, pos, seg).segments is None
    keep = np.asarray(mask)
    for platform in ("cpu", "cuda"):    # splash; Triton's kernel (traced for a GPU)
        with switch.use("kernel", interpret=True), compiling_for(platform):
            m = attention_masks(model.cfg, seg >= 0, pos, seg)
            assert isinstance(m, AttentionMask) and m.biases is None
            got_packed = np.asarray(model(ids, seg >= 0, positions_BT=pos, segments_BT=seg))
            got_padded = np.asarray(model(ids, mask))
        np.testing.assert_allclose(got_packed[real], want_packed[real], rtol=2e-5, atol=2e-5,
                                   err_msg=platform)
        np.testing.assert_allclose(got_padded[keep], want_padded[keep], rtol=2e-5, atol=2e-5,
                                   err_msg=platform)


def test_layer_scores_with_the_kernels_equal_the_scores_without():
    """The influence scores with both kernels on (interpreted: the attention and the
    segment sums) equal the scores with the references, per example and per layer."""
    model, rng = tiny_lora_decoder()
    mk = lambda k: [lj.Example(rng.integers(0, 64, t).astype(np.int32), np.arange(t) >= 1)  # noqa
                    for t in rng.integers(2, 15, k)]
    train, val = mk(10), mk(3)
    kw = dict(engine="packed", chunk_size=4, mesh=None, estimator="datainf")
    want = lj.layer_scores(model, train, val, **kw)
    with switch.use("kernel", interpret=True):
        got = lj.layer_scores(model, train, val, **kw)
    np.testing.assert_allclose(np.asarray(got.per_example), np.asarray(want.per_example),
                               rtol=1e-4, atol=1e-6 * np.abs(np.asarray(want.per_example)).max())
    np.testing.assert_allclose(np.asarray(got.layer_scores), np.asarray(want.layer_scores),
                               rtol=1e-4)


SHARDED = """
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from layerif_jax.kernels import switch
from layerif_jax import sharding as shd
from layerif_jax.data import Example
from layerif_jax.influence import layer_scores
from layerif_jax.influence.engines import packed
from conftest import tiny_lora_decoder
assert jax.device_count() == 8
model, rng = tiny_lora_decoder()
ex = lambda k: [Example(rng.integers(0, 64, t).astype(np.int32), np.arange(t) >= 1)
                for t in rng.integers(2, 15, k)]
train, val = ex(10), ex(3)
one = layer_scores(model, train, val, mesh=None, chunk_size=4)
for shape, preset in (("4x2", "fsdp_tp"), ("8x1", "fsdp")):
    with switch.use("kernel", interpret=True):
        r = layer_scores(model, train, val, mesh=shape, sharding=preset, chunk_size=4)
        eng = packed.PackedEngine(model, dtype=None, mesh=shd.make_mesh(shape), chunk_size=4,
                                  row_len=None, sharding=preset)
        eng.plan([train])
        call = eng.chunks(train)[0]
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        fn = packed.build_fn(graphdef, None, eng.slots_local, eng.per_row, eng.mesh,
                             sharding=preset)
        text = str(jax.make_jaxpr(fn)(eng.params, eng.rest, *call.arrays))
    # the attention kernel in a shard_map (the segment sums keep their reference there)
    print("KERNEL", shape, text.count("pallas_call") > 0, "shard_map" in text)
    rel = float(np.max(np.abs(r.per_example - one.per_example)) / np.max(np.abs(one.per_example)))
    print("REL", shape, rel)
"""


def test_sharded_presets_run_the_kernel_in_a_shard_map(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert [l for l in lines if l.startswith("KERNEL")] == [
        "KERNEL 4x2 True True", "KERNEL 8x1 True True"], out.stdout
    rels = [float(l.split()[2]) for l in lines if l.startswith("REL")]
    assert len(rels) == 2 and all(r < 1e-5 for r in rels), rels


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                    reason="GPU compiles need the JAX CUDA plugin")
@pytest.mark.heavy   # leg 1 only: XLA:GPU compiles the step (about half a minute)
def test_the_influence_step_for_an_h200_takes_the_triton_kernel():
    """The packed engine's training call compiled for one H200 (XLA:GPU, the JAX CUDA
    plugin) runs attention as Triton's flash attention (forward, and the backward's two
    calls, in the layer scan's body); with switch.use("reference") it has none."""
    from jax.sharding import Mesh

    from layerif_jax.influence import plan as planmod
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.lora import LoraConfig
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128)
    model = planmod.abstract_model(cfg, LoraConfig(rank=8, alpha=16.0), jnp.bfloat16)
    _, devs = planmod.topology("h200")
    mesh = Mesh(np.array(devs), ("data",))
    geo = planmod.Geometry.of(64, 8, len(devs))
    for impl in ("auto", "reference"):
        with switch.use(impl):
            hlo = planmod.lower_call(model, geo, 1, mesh, jnp.bfloat16, "cuda").compile().as_text()
        n = sum('custom_call_target="__gpu$xla.gpu.triton"' in ln and "mha" in ln
                for ln in hlo.splitlines())
        assert (n >= 3) if impl == "auto" else n == 0, (impl, n)
