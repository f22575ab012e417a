"""segment_outer / lora_grads / lora_scores: the Pallas kernels (interpreted on CPU; the TPU
kernel compiled for TPU with libtpu, the GPU kernel for an H200 with the JAX CUDA plugin)
and the pure-JAX reference against float64 NumPy sums over each example's tokens, forward
and gradients, on random packed layouts: padding, empty example slots, one-token
examples, several token and column tiles; float32 and bfloat16 inputs.

The Mosaic GPU kernel (gpu.py) runs on CPU in Mosaic GPU's own interpreter (jax 0.10 and
0.12: `interpret=InterpretGPUParams()`, which simulates the warpgroup's threads, shared
memory, TMA copies, barriers and wgmma; uninitialised shared memory reads as NaN), the
same kernel body that compiles for the H200. Its tolerance is its stated precision: bf16
tensor-core products with w (and float32 x) split in two bf16 parts, bounded elementwise
by (eps + T 2^-23) sum_t |w_t| |x_t| with eps = 2^-16 (bf16 x) or 3 2^-16 (float32 x)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.kernels import switch
from layerif_jax.kernels.segment_grads import lora_grads, lora_scores, segment_outer, tpu

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="TPU compiles need the libtpu wheel")
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="GPU compiles need the JAX "
                                       "CUDA plugin (pip install 'jax[cuda12-local]')")


def layout(rng, R, T, J):
    """Rows of consecutive examples (as the packer writes them): random lengths, some one
    token long, some slots left empty, padding (-1) at the end of a row."""
    seg = np.full((R, T), -1, np.int32)
    for r in range(R):
        off = 0
        for j in range(J):
            if (r, j) == (0, 1) or rng.random() < 0.25:         # an empty slot
                continue
            one = (r, j) == (0, 0) or rng.random() < 0.3
            t = 1 if one else int(rng.integers(2, max(3, T // J)))
            seg[r, off:off + t] = j
            off += t
            if off >= T:
                break
    return seg


def numpy_outer(seg, w, x, J):
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    out = np.zeros((seg.shape[0], J, w.shape[-1], x.shape[-1]))
    for r in range(seg.shape[0]):
        for j in range(J):
            tok = seg[r] == j
            out[r, j] = w[r, tok].T @ x[r, tok]
    return out


# (R, T, k, N, J): one tile; several T tiles (640 = 5 x 128); two N tiles (2048 = 2 x 1024);
# k not a multiple of 8 (padded); N not a multiple of 128 (taken whole)
SHAPES = [(2, 128, 8, 256, 3), (2, 640, 3, 384, 6), (1, 256, 8, 2048, 4), (3, 200, 5, 72, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_against_float64(shape, dtype):
    R, T, k, N, J = shape
    rng = np.random.default_rng(sum(shape))
    seg = layout(rng, R, T, J)
    assert (seg[0] == 0).sum() == 1 and not (seg[0] == 1).any()
    w = jnp.asarray(rng.normal(size=(R, T, k)), dtype)
    x = jnp.asarray(rng.normal(size=(R, T, N)), dtype)
    want = numpy_outer(seg, w.astype(jnp.float32), x.astype(jnp.float32), J)  # rounded inputs
    scale = np.abs(want).max()
    for impl in ("kernel", "reference"):
        got = segment_outer(jnp.asarray(seg), w, x, J, impl=impl, interpret=True)
        assert got.shape == (R, J, k, N) and got.dtype == jnp.float32
        # float32 sums of the (bf16-rounded) inputs: a float32 rounding error per token
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * scale * T ** .5)
    empty = [(r, j) for r in range(R) for j in range(J) if not (seg[r] == j).any()]
    for r, j in empty:
        assert not np.asarray(got[r, j]).any()


def test_gradients_against_float64():
    R, T, k, N, J = 2, 256, 3, 128, 4
    rng = np.random.default_rng(7)
    seg = layout(rng, R, T, J)
    w, x = rng.normal(size=(R, T, k)), rng.normal(size=(R, T, N))
    c = rng.normal(size=(R, J, k, N))
    # d/dw sum(out * c) = c[seg_t] x_t and d/dx = w_t^T c[seg_t]; zero for padding tokens
    cs = np.where((seg >= 0)[..., None, None], c[np.arange(R)[:, None], np.clip(seg, 0, J - 1)], 0)
    dw_want = np.einsum("rtkn,rtn->rtk", cs, x)
    dx_want = np.einsum("rtk,rtkn->rtn", w, cs)
    f32 = lambda a: jnp.asarray(a, jnp.float32)   # noqa: E731
    for impl in ("kernel", "reference"):
        f = lambda w_, x_: jnp.sum(segment_outer(jnp.asarray(seg), w_, x_, J, impl=impl,  # noqa: E731
                                                 interpret=True) * f32(c))
        dw, dx = jax.grad(f, argnums=(0, 1))(f32(w), f32(x))
        np.testing.assert_allclose(np.asarray(dw), dw_want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dx), dx_want, rtol=1e-5, atol=1e-4)


def test_lora_grads_are_each_examples_lora_gradients():
    R, T, I, O, k, J, s = 2, 128, 24, 40, 4, 3, 0.7
    rng = np.random.default_rng(3)
    seg = layout(rng, R, T, J)
    x, dy = rng.normal(size=(R, T, I)), rng.normal(size=(R, T, O))
    a, b = rng.normal(size=(I, k)), rng.normal(size=(k, O))
    f32 = lambda z: jnp.asarray(z, jnp.float32)   # noqa: E731
    gA, gB = lora_grads(f32(x), f32(dy), jnp.asarray(seg), f32(a), f32(b), s, J, impl="kernel",
                        interpret=True)
    for r in range(R):
        for j in range(J):
            tok = seg[r] == j
            np.testing.assert_allclose(np.asarray(gA[r, j]), s * x[r, tok].T @ (dy[r, tok] @ b.T),
                                       rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(np.asarray(gB[r, j]), s * (x[r, tok] @ a).T @ dy[r, tok],
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M, dtype", [(1, jnp.float32), (3, jnp.float32), (2, jnp.bfloat16)])
def test_lora_scores_are_each_examples_gradients_dotted_with_h(M, dtype):
    """h . g_e with no g_e formed, against float64 NumPy: each example's LoRA gradients
    (explicit sums over its tokens) dotted with each direction; empty slots and padding
    score zero."""
    R, T, I, O, k, J, s = 2, 96, 24, 40, 4, 3, 0.7
    rng = np.random.default_rng(M)
    seg = layout(rng, R, T, J)
    x, dy = (jnp.asarray(rng.normal(size=sh), dtype) for sh in ((R, T, I), (R, T, O)))
    a, b = jnp.asarray(rng.normal(size=(I, k)), dtype), jnp.asarray(rng.normal(size=(k, O)), dtype)
    ha, hb = rng.normal(size=(M, I, k)), rng.normal(size=(M, k, O))
    sa, sb = lora_scores(x, dy, jnp.asarray(seg), a, b, jnp.asarray(ha), jnp.asarray(hb), s, J)
    assert sa.shape == sb.shape == (R, J, M) and sa.dtype == jnp.float32
    x64, dy64, a64, b64 = (np.asarray(z.astype(jnp.float32), np.float64) for z in (x, dy, a, b))
    for r in range(R):
        for j in range(J):
            tok = seg[r] == j
            gA = s * x64[r, tok].T @ (dy64[r, tok] @ b64.T)
            gB = s * (x64[r, tok] @ a64).T @ dy64[r, tok]
            # float32 sums of the (rounded) inputs over at most T tokens
            tol = 1e-5 * (np.abs(ha).sum((1, 2)).max() * np.abs(gA).max() + 1)
            np.testing.assert_allclose(np.asarray(sa[r, j]), np.einsum("mik,ik->m", ha, gA),
                                       rtol=1e-4, atol=tol)
            tol = 1e-5 * (np.abs(hb).sum((1, 2)).max() * np.abs(gB).max() + 1)
            np.testing.assert_allclose(np.asarray(sb[r, j]), np.einsum("mko,ko->m", hb, gB),
                                       rtol=1e-4, atol=tol)
            if not tok.any():
                assert not np.asarray(sa[r, j]).any() and not np.asarray(sb[r, j]).any()
    with pytest.raises(ValueError, match="do not match the factors"):
        lora_scores(x, dy, jnp.asarray(seg), a, b, jnp.asarray(ha[:, :-1]), jnp.asarray(hb), s, J)


def _has_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _kernel_in(fn, *args) -> str | None:
    """Which kernel a trace holds: "tpu" (a pallas_call), "gpu" (Mosaic GPU's wgmma) or None."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "tpu" if "pallas_call" in jaxpr else "gpu" if "wgmma" in jaxpr else None


def test_the_switch():
    seg, w, x = jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128, 8)), jnp.ones((1, 128, 128))
    run = lambda **kw: lambda s, w_, x_: segment_outer(s, w_, x_, 2, **kw)   # noqa: E731
    assert not _has_pallas(run(), seg, w, x)                 # auto on CPU: the reference
    assert _has_pallas(run(platform="tpu"), seg, w, x)       # auto for a TPU: the kernel
    assert not _has_pallas(run(platform="tpu", impl="reference"), seg, w, x)
    assert _kernel_in(run(platform="cuda"), seg, w, x) == "gpu"   # auto for an NVIDIA GPU
    assert _kernel_in(run(platform="tpu"), seg, w, x) == "tpu"
    assert _kernel_in(run(platform="cuda", impl="reference"), seg, w, x) is None
    assert _kernel_in(run(platform="cuda", interpret=True), seg, w, x) == "gpu"
    assert _kernel_in(run(platform="gpu"), seg, w, x) is None      # no local Hopper here
    with switch.use("kernel", interpret=True):
        assert _kernel_in(run(platform="cuda"), seg, w, x) == "gpu"
    with switch.use("reference"):
        assert _kernel_in(run(platform="cuda"), seg, w, x) is None
    assert _has_pallas(run(interpret=True), seg, w, x)
    with switch.use("kernel", interpret=True):
        assert _has_pallas(run(), seg, w, x)
        assert not _has_pallas(run(impl="reference"), seg, w, x)   # the call's own choice
    with switch.use("reference"):
        assert not _has_pallas(run(platform="tpu"), seg, w, x)
    with pytest.raises(ValueError, match="no kernel of this op is written for cpu"):
        run(impl="kernel")(seg, w, x)
    with pytest.raises(ValueError, match="must be one of auto, kernel, reference"):
        run(impl="pallas")(seg, w, x)
    with pytest.raises(ValueError, match="must share R and T"):
        segment_outer(seg, w[:, :64], x, 2)


def test_tiles():
    assert (tpu._tile(4096, 1024), tpu._tile(576, 1024), tpu._tile(640, 512),
            tpu._tile(72, 1024)) == (1024, 576, 128, 72)


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_compiles_for_tpu(chip):
    """The Mosaic compiler accepts the kernel at a Mistral-7B map's shapes (bf16 x [R, T,
    4096], rank 8; a 14336-wide output) and it appears in the compiled program."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from layerif_jax.influence.plan import topology
    _, devs = topology(f"{chip}:1x1")
    rep = NamedSharding(Mesh(np.array(devs[:1]), ("d",)), P())
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)   # noqa: E731
    R, T, I, O, k, J = 2, 256, 4096, 14336, 8, 8
    f = jax.jit(lambda x, dy, s, a, b: lora_grads(x, dy, s, a, b, 2.0, J, platform="tpu"))
    c = f.lower(S((R, T, I), jnp.bfloat16), S((R, T, O), jnp.bfloat16), S((R, T), jnp.int32),
                S((I, k), jnp.bfloat16), S((k, O), jnp.bfloat16)).compile()
    assert c.as_text().count('custom_call_target="tpu_custom_call"') == 2
    m = c.memory_analysis()
    # the [.., I, 8] gradient of A is not padded to 128 lanes (XLA picks its layout)
    assert 0 <= m.output_size_in_bytes - R * J * k * (I + O) * 4 <= 1024


@needs_libtpu
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_compiles_inside_the_influence_step(chip):
    """The packed engine's training call for a 2x2 slice takes the kernel (twice per LoRA
    map in the layer scan's body; with the attention kernel's three) and the TPU compiler
    accepts it; with
    switch.use("reference") the same call has none."""
    from jax.sharding import Mesh

    from layerif_jax.influence import plan as planmod
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.lora import LoraConfig
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128)
    model = planmod.abstract_model(cfg, LoraConfig(rank=8, alpha=16.0), jnp.bfloat16)
    _, devs = planmod.topology(f"{chip}:2x2")
    mesh = Mesh(np.array(devs), ("data",))
    geo = planmod.Geometry.of(64, 8, len(devs))
    maps = len(model.packed_lora())
    # auto: 2 segment sums per LoRA map, and splash attention's forward, dq and dkv kernels
    for impl, want in (("auto", 2 * maps + 3), ("reference", 0)):
        with switch.use(impl):
            hlo = planmod.lower_call(model, geo, 1, mesh, jnp.bfloat16, "tpu").compile().as_text()
        assert hlo.count('custom_call_target="tpu_custom_call"') == want, impl


# ---- the GPU kernel (Mosaic GPU, Hopper) --------------------------------------------------

def _gpu_tolerance(seg, w, x, J):
    """gpu.py's precision, elementwise: (eps + T 2^-23) sum_{t in e} |w_t| |x_t|."""
    eps = 2.0 ** -16 * (1 if x.dtype == jnp.bfloat16 else 3)
    bound = numpy_outer(seg, np.abs(np.asarray(w, np.float32)),
                        np.abs(np.asarray(x.astype(jnp.float32))), J)
    return (eps + seg.shape[1] * 2.0 ** -23) * bound


# SHAPES, plus examples in two groups of one block each (J k = 20 x 8 > 128 rows) and a
# rank that leaves 64 - 7 x 9 = 1 padding row
GPU_SHAPES = SHAPES + [(1, 128, 8, 128, 20), (2, 192, 9, 128, 7)]


@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_forward_against_float64(shape, dtype):
    """The Mosaic GPU kernel, interpreted, through the public entry point (platform "cuda"):
    every example's sum within the kernel's stated precision, empty slots exactly zero."""
    from layerif_jax.kernels.segment_grads import gpu
    R, T, k, N, J = shape
    rng = np.random.default_rng(sum(shape))
    seg = layout(rng, R, T, J)
    w = jnp.asarray(rng.normal(size=(R, T, k)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(R, T, N)), dtype)
    want = numpy_outer(seg, w, x.astype(jnp.float32), J)
    run = lambda s, w_, x_: segment_outer(s, w_, x_, J, impl="kernel", interpret=True,  # noqa: E731
                                          platform="cuda")
    assert _kernel_in(run, jnp.asarray(seg), w, x) == "gpu"
    got = run(jnp.asarray(seg), w, x)
    assert got.shape == (R, J, k, N) and got.dtype == jnp.float32
    err = np.abs(np.asarray(got) - want)
    tol = _gpu_tolerance(seg, w, x, J)
    assert (err <= tol).all(), (err.max(), (err / np.maximum(tol, 1e-30)).max())
    # two bf16 parts of w, not one: w rounded to bf16 once is 14-21x over this on SHAPES
    assert err.max() <= 2.0 ** -13 * np.abs(want).max()
    for r, j in [(r, j) for r in range(R) for j in range(J) if not (seg[r] == j).any()]:
        assert not np.asarray(got[r, j]).any()
    p = gpu.plan(T, N, k, J, dtype)
    assert p["groups"] == (2 if J * k > gpu.MAX_M else 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_gradients_against_float64(dtype):
    """Values and gradients of sum(out * c) through the custom_vjp with the GPU kernel in
    the forward (interpreted) and the reference's VJP in the backward."""
    R, T, k, N, J = 2, 256, 3, 128, 4
    rng = np.random.default_rng(11)
    seg = layout(rng, R, T, J)
    w = jnp.asarray(rng.normal(size=(R, T, k)), dtype)
    x = jnp.asarray(rng.normal(size=(R, T, N)), dtype)
    w64, x64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (w, x))
    c = rng.normal(size=(R, J, k, N))
    cs = np.where((seg >= 0)[..., None, None], c[np.arange(R)[:, None], np.clip(seg, 0, J - 1)], 0)
    def f(w_, x_):
        out = segment_outer(jnp.asarray(seg), w_, x_, J, impl="kernel", interpret=True,
                            platform="cuda")
        return jnp.sum(out * jnp.asarray(c, jnp.float32))
    val, (dw, dx) = jax.value_and_grad(f, argnums=(0, 1))(w, x)
    assert dw.dtype == w.dtype and dx.dtype == x.dtype
    val_want = np.sum(numpy_outer(seg, w64, x64, J) * c)
    val_tol = np.sum(_gpu_tolerance(seg, w, x, J) * np.abs(c))
    assert abs(float(val) - val_want) <= val_tol, (float(val), val_want, val_tol)
    # the backward is float32 (cast to the inputs' dtype): bf16 rounding of dw and dx
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == jnp.float32 else dict(rtol=2 ** -7, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw.astype(jnp.float32)),
                               np.einsum("rtkn,rtn->rtk", cs, x64), **tol)
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)),
                               np.einsum("rtk,rtkn->rtn", w64, cs), **tol)


def test_gpu_tiles():
    from layerif_jax.kernels.segment_grads import gpu
    # a Mistral-7B map: one block per (row, 128 columns), 64 rows (8 examples x rank 8)
    p = gpu.plan(256, 14336, 8, 8, jnp.bfloat16)
    assert (p["Tp"], p["Np"], p["tN"], p["M"], p["groups"], p["stages"]) == \
        (256, 14336, 128, 64, 1, 4)
    assert p["smem_bytes"] <= 128 * 1024
    q = gpu.plan(200, 72, 5, 2, jnp.float16)        # padded to tiles; f16 runs as float32
    assert (q["Tp"], q["Np"], q["tN"], q["M"], q["x_dtype"]) == (256, 128, 128, 64, jnp.float32)
    assert gpu.plan(128, 192, 8, 40, jnp.bfloat16)["groups"] == 3      # 16 examples a block
    for J, k, dt, stages in [(16, 8, jnp.float32, 2), (128, 1, jnp.float32, 2),
                             (1, 128, jnp.bfloat16, 2), (2, 64, jnp.float32, 1)]:
        p = gpu.plan(4096, 14336, k, J, dt)       # fewer tiles in flight for large ranks
        assert p["smem_bytes"] <= gpu.SMEM_BUDGET and p["stages"] == stages, (J, k, p)
    with pytest.raises(ValueError, match="rank 129"):
        gpu.plan(128, 128, 129, 1, jnp.bfloat16)


def _h200_replicated():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from layerif_jax.influence.plan import topology
    _, devs = topology("h200")
    return NamedSharding(Mesh(np.array(devs[:1]), ("d",)), P())


MOSAIC_GPU_CALL = 'custom_call_target="mosaic_gpu_v2"'


@needs_cuda_plugin
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiles_for_h200(dtype):
    """XLA:GPU and the Mosaic GPU compiler (sm_90a, the H200's shared memory) accept the
    kernel at a Mistral-7B map's shapes (x [R, T, 4096], dy [R, T, 14336], rank 8, 8
    examples a row), once per gradient, and nothing of the reference's masked copies is
    left in the program."""
    rep = _h200_replicated()
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)   # noqa: E731
    R, T, I, O, k, J = 2, 256, 4096, 14336, 8, 8
    f = jax.jit(lambda x, dy, s, a, b: lora_grads(x, dy, s, a, b, 2.0, J, platform="cuda"))
    c = f.lower(S((R, T, I), dtype), S((R, T, O), dtype), S((R, T), jnp.int32),
                S((I, k), dtype), S((k, O), dtype)).compile()
    hlo = c.as_text()
    assert hlo.count(MOSAIC_GPU_CALL) == 2
    # the kernels' outputs are the gradients themselves: no [R, J, T, k] masked copies
    assert f"[{R},{J},{T},{k}]" not in hlo


@needs_cuda_plugin
def test_compiles_inside_the_influence_step_for_h200():
    """The packed engine's training call for one H200 takes the GPU kernel (twice per LoRA
    map in the layer scan's body) and XLA:GPU compiles it; with switch.use("reference")
    the same call has none."""
    import re

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
    maps = len(model.packed_lora())
    for impl, want in (("auto", 2 * maps), ("reference", 0)):
        with switch.use(impl):
            hlo = planmod.lower_call(model, geo, 1, mesh, jnp.bfloat16, "cuda").compile().as_text()
        ours = [ln for ln in hlo.splitlines()
                if MOSAIC_GPU_CALL in ln and re.search(r'op_name="[^"]*segment_outer', ln)]
        assert len(ours) == want, impl


@needs_cuda_plugin
@pytest.mark.parametrize("T, N, k, J, dtype", [
    (4096, 14336, 8, 16, jnp.float32),     # 128 rows, float32 x: two x tiles in flight
    (1024, 4096, 64, 2, jnp.float32),      # a large rank: one x tile in flight
    (1024, 4096, 32, 4, jnp.bfloat16),     # 128 rows of rank 32
    (200, 72, 5, 30, jnp.bfloat16),        # padded T and N, two example groups
])
def test_compiles_for_h200_at_the_shared_memory_edges(T, N, k, J, dtype):
    """Blocks near the H200's 227 KiB of shared memory (the compiler refuses one beyond:
    "exceeds available shared memory"; its count was within 1 KiB of `gpu.plan`'s), more
    rows, large ranks, padding and example groups compile."""
    from layerif_jax.kernels.segment_grads import gpu
    assert gpu.plan(T, N, k, J, dtype)["smem_bytes"] <= gpu.SMEM_BUDGET
    rep = _h200_replicated()
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)   # noqa: E731
    f = jax.jit(lambda s, w, x: gpu.segment_outer(s, w, x, J))
    hlo = f.lower(S((1, T), jnp.int32), S((1, T, k), jnp.float32),
                  S((1, T, N), dtype)).compile().as_text()
    assert hlo.count(MOSAIC_GPU_CALL) == 1
