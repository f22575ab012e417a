"""Ahead-of-time plans: the influence step of a run compiled for a real chip, without
the chip.

The real compiler of the chip (XLA:TPU from the `libtpu` wheel, XLA:GPU from the JAX CUDA
plugin with the card's target description in assets/gpu; see
../shared/docs/ACCELERATORS.md) compiles the training call of the packed engine --
per-example LoRA gradients of a chunk of packed rows, then ||g||^2 and v . g per layer
piece -- from abstract inputs (`jax.ShapeDtypeStruct`s with the mesh's shardings; no
parameter is ever allocated), and reports:

- per-device bytes from `memory_analysis()`: arguments (weights, probes, one call's
  token arrays, v), temporaries, outputs, plus the kept gradients of the training
  examples of the device (the memory plan of `driver.keep_plan`), against the chip's
  memory; whether it fits, and if not, a chunk size or memory budget that does;
- FLOPs per device per call from `cost_analysis()`, and their ratio to one plain LoRA
  forward+backward on the same chunks. The TPU compiler counts a loop body once, so
  both come from compiles with the layer scan unrolled at depths 1 and 2 (one chunk a
  call), extrapolated linearly in the depth;
- a roofline: per call max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) from the
  chip's published figures (`CHIPS`), times the calls of the run.

The parameters are laid out as a `layerif_jax.sharding` preset says (dp, fsdp, fsdp_tp).
XLA:GPU reports no costs ahead of time: a GPU plan counts FLOPs and bytes accessed with
XLA:CPU on the same traced program (`_cost_device`), and its memory check is ours (the GPU
compiler only warns when a program oversubscribes). These are compiler estimates, not
measurements.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from ..kernels import switch

from .. import dtypes
from .. import sharding as shd
from ..chips import GiB, Chip, Topology, parse_topology
from ..errors import LayerIFError
from ..io import parse_bytes
from ..models.config import ModelConfig
from ..models.decoder import dense_attention
from ..models.lora import LoraConfig
from ..ops import compiling_for, layer_remat, remat_mode
from . import core
from .engines import packed

def topology(spec) -> tuple[Chip, list]:
    """'v5e:2x4' | 'h200x8' -> (the chip, the topology's devices), from the chip compiler's
    topology description (libtpu for TPUs, the JAX CUDA plugin for NVIDIA GPUs; no chip
    needed)."""
    topo = spec if isinstance(spec, Topology) else parse_topology(spec)
    if topo.chip.platform == "cuda":
        return topo.chip, _gpu_devices(topo)
    if jax.default_backend() != "tpu":
        # libtpu as a compiler only: no lockfile (several such processes may run at once)
        # and no queries of a cloud metadata server
        for k, v in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(k, v)
    try:
        from jax.experimental import topologies
        import libtpu  # noqa: F401
    except ImportError:
        raise LayerIFError("TPU plans need the libtpu wheel matching jax: pip install "
                           "'jax[tpu]' (it compiles for TPUs on any machine)") from None
    kw = {"chips_per_host_bounds": (1, 1, 1)} if topo.chips == 1 else {}
    try:
        desc = topologies.get_topology_desc(str(topo), platform="tpu", **kw)
    except Exception as e:  # libtpu's own words (an impossible shape for the chip)
        raise LayerIFError(f"topology {str(topo)!r}: {str(e).strip().splitlines()[0]}") from None
    return topo.chip, list(desc.devices)


def target_config(chip: Chip) -> str:
    """The GpuTargetConfigProto text of a GPU chip (layerif_jax/assets/gpu)."""
    from importlib import resources
    return (resources.files("layerif_jax") / "assets" / "gpu" / chip.target_config).read_text()


def _gpu_devices(topo: Topology) -> list:
    """Compile-only devices of hosts x GPUs of the chip, from the JAX CUDA plugin (no GPU,
    no CUDA libraries: the plugin's compiler with the chip's target description)."""
    import importlib.util
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise LayerIFError("GPU plans need the JAX CUDA plugin matching jax: pip install "
                           "'jax[cuda12-local]' (it compiles for NVIDIA GPUs on any machine; "
                           "no CUDA libraries needed)")
    # the plugin checks the installed CUDA libraries' versions on start; a compile-only
    # client needs none
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies
    hosts, per_host = topo.shape
    try:
        desc = topologies.get_topology_desc(topo.chip_key, "cuda",
                                            target_config=target_config(topo.chip),
                                            topology=f"1x{hosts}x{per_host}")
    except Exception as e:  # the plugin's own words
        raise LayerIFError(f"topology {str(topo)!r}: {str(e).strip().splitlines()[0]}") from None
    return list(desc.devices)


def abstract_model(cfg: ModelConfig, lora: LoraConfig, dtype):
    """The decoder with LoRA as shapes only (`nnx.eval_shape`: nothing is allocated)."""
    from ..models.decoder import Decoder
    from ..models.lora import apply_lora
    return nnx.eval_shape(lambda: apply_lora(Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)), lora))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The packed chunk shape of a run of examples of `tokens` tokens (`packed.plan`)."""
    rows: int          # rows per device per chunk
    row_len: int
    slots: int         # example slots per device per chunk
    per_row: int
    examples: int      # examples a device really packs into one chunk

    @staticmethod
    def of(tokens: int, chunk_size: int, ndev: int) -> "Geometry":
        rows, row_len, slots, per_row = packed.plan([tokens], chunk_size=-(-chunk_size // ndev))
        fit = rows * min(per_row, row_len // tokens)
        return Geometry(rows, row_len, slots, per_row, min(slots, fit))


def _sds(tree, sharding):
    """Abstract arrays of `tree`, laid out as `sharding` (one, or a tree like `tree`)."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)


def _step(graphdef, dtype, geo: Geometry, mesh, sharding: str = "dp", remat: bool = False):
    """(lora, rest, ids, seg, pos, tgt, slot_pos, v) -> (grads, ||g||^2, v . g, finite):
    the training call of the packed engine and its sums, as one program."""
    # a fresh jit, not the engine's cached one: tracing depends on `compiling_for`, which
    # jax's trace caches do not see
    fn = packed.build_fn(graphdef, dtype, geo.slots, geo.per_row, mesh, False, sharding, remat)

    def step(lora, rest, ids, seg, pos, tgt, slot_pos, v):
        g, fin = fn(lora, rest, ids, seg, pos, tgt, slot_pos)
        return g, core.sq_norms(g), core.dots(g, v), fin
    return jax.jit(step)


def _score_step(graphdef, dtype, geo: Geometry, mesh, sharding: str = "dp",
                remat: bool = False):
    """(lora, rest, ids, seg, pos, tgt, slot_pos, h) -> (h . g_e [rows, 1, P], finite): a
    recomputed training call of the score pass, with no per-example gradient formed
    (`packed.packed_score_fn`), in `_step`'s argument order (h in v's place)."""
    fn = packed.build_fn(graphdef, dtype, geo.slots, geo.per_row, mesh, False, sharding,
                         remat, scores=True)
    return jax.jit(lambda lora, rest, *a: fn(lora, rest, a[-1], *a[:-1]))


def _fwd_bwd(graphdef, dtype, per_row: int, remat: bool = False):
    """One plain LoRA forward+backward of the same packed chunk (the FLOPs baseline), with
    every block rematerialised or not."""
    def fb(lora, rest, ids, seg, pos, tgt):
        def loss(lora):
            model = nnx.merge(graphdef, lora, rest)
            x = model.hidden_states(ids, seg >= 0, positions_BT=pos, segments_BT=seg,
                                    dtype=dtype)
            w = packed.chunk_weights(seg, tgt, per_row)[1]
            return jnp.sum(model.next_token_nll(x, ids) * w)
        with layer_remat(remat):
            return jax.grad(loss)(lora)
    return jax.jit(fb)


def _step_args(model, geo: Geometry, k: int, ndev: int, rep, rows_sharding, params=None):
    """Abstract inputs of `_step` for k chunks a call over ndev data shards; params:
    (lora, rest) shardings (default: `rep`)."""
    _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    sh_lora, sh_rest = params if params is not None else (rep, rep)
    R, T = geo.rows * ndev, geo.row_len
    tok = lambda dt: jax.ShapeDtypeStruct((k, R, T), dt, sharding=rows_sharding)  # noqa: E731
    v = [jax.ShapeDtypeStruct((1, *x.shape), jnp.float32, sharding=rep)
         for x in jax.tree.leaves(lora)]
    return (_sds(lora, sh_lora), _sds(rest, sh_rest), tok(jnp.int32), tok(jnp.int32), tok(jnp.int32),
            tok(jnp.bool_), jax.ShapeDtypeStruct((k, geo.slots * ndev), jnp.int32,
                                                 sharding=rows_sharding), v)


def _costs(compiled) -> tuple[float, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    if not ca or "flops" not in ca:
        raise LayerIFError("the compiler gives no cost analysis for this platform")
    return float(ca["flops"]), float(ca.get("bytes accessed", 0.0))


def per_chunk_costs(cfg: ModelConfig, lora: LoraConfig, dtype, geo: Geometry, device,
                    platform: str, remat: bool = False,
                    scores: bool = False) -> dict[str, float]:
    """FLOPs and bytes accessed of one device's chunk, for the influence step and for a
    plain forward+backward (with remat: also for a rematerialised one; with scores: also
    for the score pass's call, `_score_step`): compiles at depths 1 and 2 with the layer
    scan unrolled, extrapolated to cfg.num_layers (the compiler counts a loop body once).
    Attention is counted as the dense path (`decoder.dense_attention`): splash attention
    declares no cost to the compiler; its work is at most that (it skips masked blocks)."""
    one = SingleDeviceSharding(device)
    out = {}
    for depth in (1, 2):
        c = dataclasses.replace(cfg, num_layers=depth,
                                layer_types=None if cfg.layer_types is None
                                else cfg.layer_types[:depth])
        model = abstract_model(c, lora, dtype)
        graphdef = nnx.graphdef(model)
        args = _step_args(model, geo, 1, 1, one, one)
        with compiling_for(platform, unroll_layers=True), dense_attention():
            step = _step(graphdef, dtype, geo, None, remat=remat).lower(*args).compile()
            chunk = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=one) for a in args[2:6]]
            fbs = [_fwd_bwd(graphdef, dtype, geo.per_row, r).lower(*args[:2], *chunk).compile()
                   for r in ((False, remat) if remat else (False,))]
            if scores:
                fbs.append(_score_step(graphdef, dtype, geo, None, remat=remat).lower(
                    *args).compile())
        out[depth] = tuple(c for x in (step, *fbs) for c in _costs(x))
    L = cfg.num_layers
    names = ("flops", "bytes", "fwd_bwd_flops", "fwd_bwd_bytes")
    names += ("fwd_bwd_remat_flops", "fwd_bwd_remat_bytes") if remat else ()
    names += ("score_flops", "score_bytes") if scores else ()
    return {k: out[1][i] + (L - 1) * (out[2][i] - out[1][i]) for i, k in enumerate(names)}


def _cost_device(chip: Chip, devices: list):
    """Where FLOPs are counted: the chip itself where its compiler reports them (XLA:TPU),
    else (XLA:GPU's ahead-of-time compile reports none) XLA:CPU's count of the same program,
    traced for the chip's platform -- the same products, other fusions: its bytes accessed
    are the CPU's."""
    return devices[0] if chip.platform == "tpu" else jax.devices("cpu")[0]


def _size(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= size / 10:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} bytes"


@dataclasses.dataclass
class Plan:
    """What `plan` found; bytes are per device, FLOPs per device per call."""
    topology: str
    chip: Chip
    devices: int
    model: str
    n: int
    m: int
    tokens: int
    dtype: str
    chunk_size: int
    chunks_per_call: int
    geometry: Geometry
    calls: dict[str, int]                 # {"train": .., "val": ..}
    bytes: dict[str, int]                 # arguments, outputs, temporaries, kept gradients
    kept_examples: int
    fits: bool
    compile_error: str | None
    flops: float | None = None
    fwd_bwd_flops: float | None = None
    bytes_accessed: float | None = None
    roofline_s: float | None = None
    compile_s: float = 0.0
    advice: str | None = None
    kernels: str = "auto"                 # Pallas kernels ("auto") or their references
    sharding: str = "dp"                  # the preset of `layerif_jax.sharding`
    remat: str | None = None              # blocks recomputed in the backward (ops.layer_remat)
    mesh: str = ""                        # DATAxMODEL
    # the score pass's recomputed call (h . g_e, no gradient formed): its bytes per device
    # and, with costs, FLOPs / bytes accessed per call; None where not planned
    score_call: dict[str, float] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def data_shards(self) -> int:
        """How many ways the examples are split (the mesh's data axis)."""
        return int(self.mesh.split("x")[0]) if self.mesh else self.devices

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def lines(self) -> list[str]:
        g, b = self.geometry, self.bytes
        gi = _size
        out = [f"plan: {self.model}, {self.n} x {self.m} examples of {self.tokens} tokens, "
               f"{self.dtype}, on {self.topology} ({self.devices} x {self.chip.name}), "
               f"mesh {self.mesh or self.devices} ({self.sharding}), kernels {self.kernels}"
               f"{f', remat {self.remat}' if self.remat else ''}; "
               "compiler estimates, not measurements",
               f"  call: {self.chunks_per_call} chunk(s) of {g.rows} x {g.row_len} tokens per "
               f"device, {g.examples} examples per device per chunk; "
               f"{self.calls['train']} training + {self.calls['val']} validation calls",
               f"  per device: arguments {gi(b['arguments'])}, temporaries "
               f"{gi(b['temporaries'])}, outputs {gi(b['outputs'])}, kept gradients "
               f"{gi(b['kept_gradients'])} ({self.kept_examples} of {self.n} examples) = "
               f"{gi(self.total_bytes)} of {gi(self.chip.hbm)}: "
               + ("fits" if self.fits else "does NOT fit")]
        if self.compile_error:
            out.append(f"  compiler: {self.compile_error}")
        if self.flops is not None:
            remat = self.meta.get("per_chunk", {}).get("fwd_bwd_remat_flops")
            out.append(f"  FLOPs per device per call {self.flops:.4g}, "
                       f"{self.flops / self.fwd_bwd_flops:.4f}x one LoRA forward+backward of "
                       f"the same chunks"
                       + (f" ({self.flops / (remat * self.chunks_per_call):.4f}x one with the "
                          "same remat)" if remat else "")
                       + f"; bytes accessed {self.bytes_accessed:.4g}")
            if self.chip.platform != "tpu":
                out.append("  (FLOPs and bytes accessed: XLA:CPU's count of the same program; "
                           f"XLA:GPU reports none ahead of time)")
        if self.score_call is not None:
            sc = self.score_call
            line = (f"  score pass of a recomputed call (h . g_e, no gradient formed): "
                    f"temporaries {gi(sc['temporaries'])}, outputs {gi(sc['outputs'])}")
            if "flops" in sc and self.flops:
                line += (f"; FLOPs {sc['flops']:.4g} ({sc['flops'] / self.flops:.4f}x the "
                         f"training call's), bytes accessed {sc['bytes_accessed']:.4g}")
            out.append(line)
        if self.flops is not None:
            out.append(f"  roofline ({self.chip.peak_flops / 1e12:g} TFLOP/s bf16, "
                       f"{self.chip.bandwidth / 1e9:g} GB/s): at least {self.roofline_s:.3g} s "
                       f"for {self.n} x {self.m}")
        if self.advice:
            out.append(f"  {self.advice}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chip"] = dataclasses.asdict(self.chip)
        d["total_bytes"] = self.total_bytes
        return d


@dataclasses.dataclass(frozen=True)
class _Memory:
    """Per-device bytes of a compiled call, or (error set) what is known without it."""
    arguments: int
    outputs: int
    temporaries: int
    error: str | None = None

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def call_args(model, geo: Geometry, k: int, mesh, sharding: str = "dp") -> tuple:
    """The abstract inputs of one training call of k chunks over the mesh; the
    parameters laid out as the `sharding` preset says (`layerif_jax.sharding`)."""
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    params = None
    if sharding != "dp":
        _, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        params = (shd.shardings(lora, mesh, sharding), shd.shardings(rest, mesh, sharding))
    return _step_args(model, geo, k, shd.data_size(mesh), rep, rows, params)


def lower_call(model, geo: Geometry, k: int, mesh, dtype, platform: str,
               sharding: str = "dp", remat: bool = False, scores: bool = False):
    """The training call of the packed engine (per-example gradients of k chunks, then
    ||g||^2 and v . g), lowered for `platform` over the mesh from abstract inputs: the
    program a run on those devices executes (`.compile()` it with the chip's compiler).
    scores: the score pass's recomputed call instead (`_score_step`)."""
    make = _score_step if scores else _step
    with compiling_for(platform), target_devices(mesh):
        return make(nnx.graphdef(model), dtype, geo, mesh, sharding, remat).lower(
            *call_args(model, geo, k, mesh, sharding))


def target_devices(mesh):
    """Around an ahead-of-time lowering for a GPU from a process without one: the mesh's
    devices as the abstract mesh's device kind, which Pallas's Triton lowering of jax
    >= 0.11 reads for the compute capability (jax 0.10 left it to XLA:GPU)."""
    if mesh.devices.flat[0].platform in ("gpu", "cuda") and jax.default_backend() != "gpu":
        return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    return contextlib.nullcontext()


def _compile_call(model, geo, k, mesh, dtype, platform, sharding="dp",
                  remat=False, scores=False) -> _Memory:
    """Memory of one training call over the mesh (`memory_analysis`); when the compiler
    refuses it for want of memory, its message, the arguments' bytes from their shapes
    and the temporaries it names. scores: of the score pass's recomputed call."""
    try:
        compiled = lower_call(model, geo, k, mesh, dtype, platform, sharding, remat,
                              scores).compile()
    except Exception as e:  # the compiler's own verdict (e.g. out of HBM)
        msg = str(e).strip()
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        temps = re.search(r"HLO temporaries \(([\d.]+)G\)", msg)
        args = call_args(model, geo, k, mesh, sharding)
        return _Memory(_shard_bytes(args), 0,
                       int(float(temps.group(1)) * GiB) if temps else 0,
                       msg.splitlines()[0][:400])
    m = compiled.memory_analysis()
    return _Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.temp_size_in_bytes))


def plan(cfg: ModelConfig, lora: LoraConfig | None = None, *, topology_spec: str, n: int,
         m: int, tokens: int, **kw) -> Plan:
    """The plan of `layer_scores(engine="packed")` over n training and m validation
    examples of `tokens` tokens each, on every device of `topology_spec` (data parallel),
    compiled by the chip's own compiler; keywords as `plans`."""
    return plans(cfg, lora, topology_spec=topology_spec, sizes=[(n, m)], tokens=tokens, **kw)[0]


def plans(cfg: ModelConfig, lora: LoraConfig | None = None, *, topology_spec: str,
          sizes, tokens: int, dtype="bfloat16", chunk_size: int = 8, chunks_per_call: int = 1,
          memory_budget=None, costs: bool = True, advise: bool = True,
          model_name: str | None = None, kernels: str = "auto", sharding: str = "dp",
          mesh_shape=None, remat: bool = False, score_pass: bool | None = None) -> list[Plan]:
    """One `Plan` per (n, m) of `sizes`, from ONE compilation of the call (the sizes change
    only the number of calls and the kept gradients). memory_budget: bytes for kept
    gradients over all devices (None: keep all, as `layer_scores(memory_budget=None)`).
    kernels: "auto" (the Pallas kernels of `kernels/` written for the chip, as a run on it
    takes them) or "reference" (their pure-JAX references), see `switch.use`.
    sharding: "dp", "fsdp" or "fsdp_tp" (`layerif_jax.sharding`) over a ("data", "model")
    mesh of the slice's chips, mesh_shape "DxM" (default: every chip on "data"). remat:
    the blocks recomputed in the backward (`ops.layer_remat`: True / "mlp" or "full").
    score_pass: also compile the score pass's call for the training calls a memory budget
    leaves to be recomputed (h . g_e with no gradient formed: its memory, FLOPs, and its
    time in the roofline); None: when a memory budget is given."""
    shd.check_preset(sharding)
    try:
        remat = remat_mode(remat)
    except ValueError as e:
        raise LayerIFError(str(e)) from None
    sizes = [(int(n), int(m)) for n, m in sizes]
    for what, x in ([("n", n) for n, _ in sizes] + [("m", m) for _, m in sizes]
                    + [("tokens", tokens), ("chunk size", chunk_size),
                       ("chunks per call", chunks_per_call)]):
        if int(x) < 1:
            raise LayerIFError(f"{what} must be >= 1, got {x}")
    if tokens < 2:
        raise LayerIFError(f"an example needs at least 2 tokens, got {tokens}")
    lora = lora or LoraConfig()
    dt = dtypes.jnp_dtype(dtype)
    budget = None if memory_budget is None else parse_bytes(memory_budget, "memory budget")
    topo = parse_topology(topology_spec)
    chip, devices = topology(topo)
    if sharding == "dp" and mesh_shape not in (None, f"{len(devices)}x1"):
        raise LayerIFError(f"mesh {mesh_shape} needs sharding fsdp or fsdp_tp ('dp' splits "
                           "only the examples)")
    mesh = (Mesh(np.array(devices), ("data",)) if sharding == "dp"
            else shd.check_mesh(shd.make_mesh(mesh_shape or "auto", devices), sharding))
    ndata = shd.data_size(mesh)
    geo = Geometry.of(tokens, chunk_size, ndata)
    model = abstract_model(cfg, lora, dt)
    t0 = time.perf_counter()
    with switch.use(kernels):
        mem = _compile_call(model, geo, chunks_per_call, mesh, dt, chip.platform, sharding,
                            remat)
        if score_pass is None:
            score_pass = budget is not None
        score_mem = (_compile_call(model, geo, chunks_per_call, mesh, dt, chip.platform,
                                   sharding, remat, scores=True) if score_pass else None)
        compile_s = time.perf_counter() - t0
        c = (per_chunk_costs(cfg, lora, dt, geo, _cost_device(chip, devices), chip.platform,
                             remat, scores=score_pass) if costs else None)
    out = []
    for n, m in sizes:
        p = _account(Plan(str(topo), chip, len(devices), model_name or cfg.model_type, n, m,
                          tokens, dtypes.name(dt), chunk_size, chunks_per_call, geo, {}, {}, 0,
                          False, mem.error, compile_s=compile_s, kernels=kernels,
                          sharding=sharding, remat=remat, mesh="x".join(map(str, mesh.devices.shape))
                          if mesh.devices.ndim == 2 else f"{len(devices)}x1"),
                     model, mem, c, budget, ndata, score_mem)
        if advise and not p.fits:
            p.advice = _advice(p, lambda n=n, m=m, **kw: plan(
                cfg, lora, topology_spec=topo, n=n, m=m, tokens=tokens, dtype=dtype,
                memory_budget=memory_budget, costs=False, advise=False,
                model_name=model_name, kernels=kernels, sharding=sharding,
                mesh_shape=mesh_shape, remat=remat, **kw))
        out.append(p)
    return out


def _account(p: Plan, model, mem: _Memory, costs: dict | None, budget: int | None,
             ndev: int, score_mem: _Memory | None = None) -> Plan:
    """The run's calls, kept gradients, fit and roofline, from one compiled call (and the
    score pass's, `score_mem`); ndev data shards (each holds its rows' gradients, whole
    over the model axis)."""
    geo, k = p.geometry, p.chunks_per_call
    per_call = ndev * geo.examples * k
    p.calls = {"train": -(-p.n // per_call), "val": -(-p.m // per_call)}
    # one example's f32 gradient on one device: split over "model" where the preset splits
    # the parameter there (`sharding.grad_spec`: fsdp_tp's heads and MLP)
    tp = int(p.mesh.split("x")[1]) if p.mesh else 1
    grad_bytes = 4 * sum(math.prod(x.shape) // (tp if "model" in shd.grad_spec(
        path, x.ndim, p.sharding) else 1) for path, x in shd.leaf_paths(nnx.state(model,
                                                                              nnx.LoRAParam)))
    call_bytes = geo.slots * k * grad_bytes    # one call's gradients on one device (fillers too)
    keep_calls = p.calls["train"] if budget is None else min(
        p.calls["train"], budget // max(1, call_bytes * ndev))
    p.kept_examples = min(p.n, keep_calls * per_call)
    # the call's own output gradients are counted once, in "outputs"
    p.bytes = {"arguments": mem.arguments, "outputs": mem.outputs,
               "temporaries": mem.temporaries,
               "kept_gradients": int(max(0, keep_calls - 1) * call_bytes)}
    p.fits = mem.error is None and p.total_bytes <= p.chip.hbm
    p.meta["call_bytes"] = call_bytes
    if score_mem is not None:   # it runs in the room of a training call (and its kept ones)
        p.score_call = {"arguments": score_mem.arguments, "outputs": score_mem.outputs,
                        "temporaries": score_mem.temporaries}
        p.fits = p.fits and score_mem.error is None and (
            score_mem.total + p.bytes["kept_gradients"] <= p.chip.hbm)
    if costs is not None:
        p.flops, p.fwd_bwd_flops = costs["flops"] * k, costs["fwd_bwd_flops"] * k
        p.bytes_accessed = costs["bytes"] * k
        roof = lambda f, b: max(f / p.chip.peak_flops, b / p.chip.bandwidth)   # noqa: E731
        per_call_s = roof(p.flops, p.bytes_accessed)
        # recomputed twice more (driver): for the preconditioner (gradients) and for the
        # scores (with the score call where planned, else gradients again)
        recomputed = p.calls["train"] - keep_calls
        score_s = per_call_s
        if "score_flops" in costs:
            p.score_call.update(flops=costs["score_flops"] * k,
                                bytes_accessed=costs["score_bytes"] * k)
            score_s = roof(p.score_call["flops"], p.score_call["bytes_accessed"])
        p.roofline_s = (per_call_s * (p.calls["train"] + p.calls["val"] + recomputed)
                        + score_s * recomputed)
        p.meta["per_chunk"] = costs
    return p


def _budget_advice(p: Plan, call_bytes: int) -> str | None:
    """A memory budget for kept gradients under which `p` fits, if its call fits."""
    room = p.chip.hbm - (p.total_bytes - p.bytes["kept_gradients"])
    if p.compile_error is not None or room < 0:
        return None
    keep = int(room // call_bytes) + 1            # + the call's own output
    mb = math.ceil(keep * call_bytes * p.data_shards / 1e6)   # at least the bytes needed
    return (f"--memory-budget {mb}MB (keeps about "
            f"{min(p.n, keep * p.data_shards * p.geometry.examples * p.chunks_per_call)} of {p.n} "
            "training gradients; the others are recomputed twice more)")


def _advice(p: Plan, replan) -> str:
    """A memory budget or a chunk size that fits, or why none does. replan(chunk_size=,
    chunks_per_call=) -> the plan with those (memory only, no advice)."""
    if (budget := _budget_advice(p, p.meta["call_bytes"])) is not None:
        return f"fits with {budget}"
    size = p.chunk_size
    while size > p.data_shards or p.chunks_per_call > 1:
        size = max(p.data_shards, size // 2) if p.chunks_per_call == 1 else size
        q = replan(chunk_size=size, chunks_per_call=1)
        flags = f"--chunk-size {size} --chunks-per-call 1"
        if q.fits:
            return f"fits with {flags}"
        if (budget := _budget_advice(q, q.meta["call_bytes"])) is not None:
            return f"fits with {flags} {budget}"
        p = q
    if p.sharding == "dp":
        return ("no chunk size fits: every device holds the whole model and one chunk's "
                "activations; shard the weights (--sharding fsdp or fsdp_tp) or use a chip "
                "with more memory")
    return (f"no chunk size fits with {p.sharding} on a {p.mesh} mesh; try another mesh "
            "shape or sharding, more chips or a chip with more memory")
