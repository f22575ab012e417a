"""LayerIF layer scores: the orchestration around the pure core.

Passes (each is a loop over fixed-size chunks, one jitted call per chunk, never
over examples):

1. validation: per-example LoRA gradients, averaged into v (or kept, one v per
   validation example, with `per_val`);
2. training: per-example gradients -> ||g_i,b||^2 and v . g_i,b per unit; the
   gradients themselves are kept when n x d fits `memory_budget`, and when it does
   not, as many calls' gradients as fit are kept (`_keep_plan`);
3. the estimator's preconditioning (DataInf: one weighted gradient sum per unit);
4. scores h . g_i per unit, summed into layers.

Passes 3 and 4 stream the kept gradients and recompute the others chunk by chunk;
results do not depend on which (beyond float rounding), nor on the chunk size.
Examples are sorted by length and padded per bucket, so the number of compiled
shapes is the number of buckets.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..data import Example, bucketed_batches
from ..errors import LayerIFError
from ..io import parse_bytes
from ..notes import info, note
from ..stop import check as check_stop, checking
from . import core, packed
from .distributed import put, to_host
from .estimators import Context, get_estimator
from .partition import make_partition

AGGREGATES = ("+ve", "top25", "all")


@dataclasses.dataclass
class LayerScores:
    layer_scores: np.ndarray            # [L], the chosen aggregate
    per_example: np.ndarray             # [n, L], positive = beneficial
    aggregate: str
    estimator: str
    unit: str
    n_train: int
    n_val: int
    lambdas: np.ndarray                 # [L, U]
    unit_names: tuple[str, ...]
    seconds: float
    gradients_kept: bool                # every training gradient kept (meta: kept_examples)
    per_val_layers: np.ndarray | None = None   # [n, m, L]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_val(self) -> np.ndarray | None:
        """[n, m], summed over layers."""
        return None if self.per_val_layers is None else self.per_val_layers.sum(-1)

    def aggregated(self, how: str) -> np.ndarray:
        return np.asarray(core.aggregate(self.per_example, how))


def _check_adapter(lora_state):
    bs = [x for p, x in jax.tree_util.tree_flatten_with_path(lora_state)[0]
          if "lora_b" in jax.tree_util.keystr(p)]
    if bs and all(not bool(jnp.any(b != 0)) for b in bs):
        raise LayerIFError(
            "the LoRA adapter is freshly initialised (every B is zero, so every A-gradient is "
            "zero and influence is degenerate): fine-tune it first or load a trained adapter")


def _mesh(mesh):
    if isinstance(mesh, Mesh) and mesh.devices.ndim != 1:
        raise LayerIFError(f"influence shards examples over a 1-D mesh, got axes {mesh.axis_names}")
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if mesh == "auto":
        devs = jax.devices()
        return Mesh(np.array(devs), ("data",)) if len(devs) > 1 else None
    raise LayerIFError(f"mesh must be a jax.sharding.Mesh, 'auto' or None, got {mesh!r}")


class _Runner:
    """Turns examples into fixed-shape chunks and chunks into per-example LoRA gradients.

    engine "packed" (default): several examples per row, one batched backward per
    chunk (packed.py); "vmap": `vmap(grad)` over length-bucketed, padded batches.
    Either way a chunk has `slots` example slots (filler slots give exact zeros),
    and `chunk.index` maps slots to input positions (-1 = filler).
    """

    def __init__(self, model, *, dtype, mesh: Mesh | None, engine: str, chunk_size: int,
                 bucket_multiple: int, row_len: int | None, chunks_per_call: int = 1):
        if engine not in ENGINES:
            raise LayerIFError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        if chunks_per_call < 1:
            raise LayerIFError(f"chunks per call must be >= 1, got {chunks_per_call}")
        self.chunks_per_call = chunks_per_call
        graphdef, self.lora, self.rest = nnx.split(model, nnx.LoRAParam, ...)
        self.graphdef, self.dtype, self.mesh, self.engine = graphdef, dtype, mesh, engine
        self.ndev = 1 if mesh is None else mesh.devices.size
        self.chunk_size, self.bucket_multiple, self.row_len = chunk_size, bucket_multiple, row_len
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            self.lora = put(self.lora, rep)
            self.rest = put(self.rest, rep)
            self._shard = NamedSharding(mesh, P(mesh.axis_names[0]))
            self._group_shard = NamedSharding(mesh, P(None, mesh.axis_names[0]))
        self.fn = None

    def plan(self, examples_sets: Sequence[Sequence[Example]]):
        """Fix the chunk shapes once for all example sets (one compilation)."""
        lengths = [len(e.ids) for ex in examples_sets for e in ex]
        self.max_len = max(lengths)
        if self.engine == "vmap":
            self.slots = -(-self.chunk_size // self.ndev) * self.ndev
            self.fn = _compiled_vmap_fn(self.graphdef, self.dtype)
            return
        per_dev = max(1, -(-self.chunk_size // self.ndev))
        self.rows, self.row_len_, self.slots_local, self.per_row = packed.plan(
            lengths, chunk_size=per_dev, row_len=self.row_len)
        self.slots = self.slots_local * self.ndev
        self.fn = _compiled_packed_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                                      self.mesh)
        self.probes = packed.zero_probes(nnx.merge(self.graphdef, self.lora, self.rest),
                                         self.rows * self.ndev, self.per_row)
        if self.mesh is not None:
            self.probes = put(self.probes, NamedSharding(self.mesh, P(None, self.mesh.axis_names[0])))

    def chunks(self, examples: Sequence[Example]) -> list:
        if self.engine == "vmap":
            return list(bucketed_batches(examples, self.slots, multiple=self.bucket_multiple,
                                         max_len=self.max_len))
        chunks = self.packed_chunks(examples)
        k = self.chunks_per_call
        return [_Group.of(chunks[i:i + k], self.ndev) for i in range(0, len(chunks), k)]

    def packed_chunks(self, examples: Sequence[Example]) -> list[packed.PackedChunk]:
        """The packed chunks (each with the rows of every device), before grouping."""
        local = packed.pack_chunks(examples, rows=self.rows, row_len=self.row_len_,
                                   slots=self.slots_local, per_row=self.per_row)
        while len(local) % self.ndev:
            local.append(packed.empty_chunk(self.rows, self.row_len_, self.slots_local,
                                            self.per_row))
        return [packed.PackedChunk(*(np.concatenate(parts) for parts in zip(
                    *(dataclasses.astuple(c) for c in local[k:k + self.ndev]))))
                for k in range(0, len(local), self.ndev)]

    def grads(self, c):
        """Per-example gradients of a vmap batch or a packed group: (leaves [rows, L, ...]
        lora-shaped, finite [rows]), rows in the order of `c.index`."""
        if self.engine == "vmap":
            arrs = (c.ids, c.mask, c.targets)
            if self.mesh is not None:
                arrs = tuple(put(a, self._shard) for a in arrs)
            return self.fn(self.lora, self.rest, *arrs)
        arrs = c.arrays
        if self.mesh is not None:
            arrs = tuple(put(a, self._group_shard) for a in arrs)
        return self.fn(self.lora, self.rest, *arrs, self.probes)


ENGINES = ("packed", "vmap")


@dataclasses.dataclass(frozen=True)
class _Group:
    """k packed chunks run by ONE call (`lax.map` inside the jit): XLA:CPU maps a fresh
    temp buffer per call, so one call per chunk pays the page faults k times.

    arrays: (ids, segments, positions, targets, slot_pos), each stacked [k, ...].
    index: input index of every output row; the call returns, per device, its slots
    slot-major and chunk-minor (so that the output stays sharded by device).
    """
    arrays: tuple
    index: np.ndarray
    num_chunks: int
    chunk_shape: tuple

    @staticmethod
    def of(chunks: Sequence[packed.PackedChunk], ndev: int) -> "_Group":
        arrays = tuple(np.stack(x) for x in zip(*[(c.ids, c.segments, c.positions, c.targets,
                                                   c.slot_pos) for c in chunks]))
        idx = np.stack([c.index for c in chunks])                       # [k, ndev * E]
        k, e = idx.shape
        index = idx.reshape(k, ndev, e // ndev).transpose(1, 2, 0).reshape(-1)
        return _Group(arrays, index, k, tuple(chunks[0].ids.shape))


@functools.lru_cache(maxsize=8)
def _compiled_vmap_fn(graphdef, dtype):
    """One jitted gradient function per model structure and dtype (reused across calls)."""
    return jax.jit(core.per_example_grad_fn(graphdef, dtype))


@functools.lru_cache(maxsize=8)
def _compiled_packed_fn(graphdef, dtype, slots, per_row, mesh):
    """jit((lora, rest, ids, segments, positions, targets, slot_pos [k, ...], probes)
    -> (grads [E * k, L, ...], finite [E * k])): k chunks in one call, see `_Group`."""
    fn = packed.packed_grad_fn(graphdef, slots=slots, per_row=per_row, dtype=dtype)

    def group_fn(lora, rest, ids, seg, pos, tgt, slot_pos, probes):
        g, fin = jax.lax.map(lambda a: fn(lora, rest, *a, probes), (ids, seg, pos, tgt, slot_pos))
        slot_major = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
        return jax.tree.map(slot_major, g), slot_major(fin)

    if mesh is not None:  # each device packs and differentiates its own rows and slots
        ax = mesh.axis_names[0]
        group_fn = jax.shard_map(
            group_fn, mesh=mesh, in_specs=(P(), P(), *(P(None, ax),) * 6),
            out_specs=(P(ax), P(ax)), check_vma=False)
    return jax.jit(group_fn)


_sq_norms = jax.jit(core.sq_norms)
_dots = jax.jit(core.dots)
_mean = jax.jit(core.mean_leaves, static_argnums=1)


def _progress(it, total, desc, enabled):
    """The items of `it`, with a progress bar (process 0) and a stop check before each:
    a Ctrl-C or SIGTERM (`layerif_jax.stop`) ends the run between two calls."""
    bar = None
    if enabled and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="chunk", leave=False)
    with checking():
        try:
            for x in it:
                check_stop()
                yield x
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()


def _raise_nonfinite(finite_chunks, batches, what):
    bad = sorted(int(i) for f, b in zip(finite_chunks, batches)
           for i, ok in zip(b.index, to_host(f)) if i >= 0 and not ok)
    if bad:
        raise LayerIFError(f"NaN or inf in the gradient of {what} example(s) {bad[:10]}"
                           f"{' ...' if len(bad) > 10 else ''} (index in the input order)")


def _keep_plan(calls, bytes_per_row: int, budget: int | None) -> np.ndarray:
    """Which training calls keep their gradients under `budget` (bytes).

    All of them when n x d fits. Otherwise a greedy knapsack: calls with the most
    token slots per kept byte first (a recomputation costs the call's tokens, keeping
    costs its rows), each taken while it still fits. So a budget a little below
    n x d costs a few recomputed calls, not two more passes over the training set.
    """
    rows = np.array([len(b.index) for b in calls])
    if budget is None or bytes_per_row * rows.sum() <= budget:
        return np.ones(len(calls), bool)
    tokens = np.array([getattr(b, "num_chunks", 1) * int(np.prod(_chunk_shape(b)))
                       for b in calls], float)
    keep, used = np.zeros(len(calls), bool), 0
    for k in np.argsort(-tokens / rows, kind="stable"):
        if used + bytes_per_row * rows[k] <= budget:
            keep[k], used = True, used + bytes_per_row * rows[k]
    return keep


def _chunk_shape(b) -> tuple:
    return b.chunk_shape if isinstance(b, _Group) else tuple(b.ids.shape)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _say_memory_plan(calls, keep_call, need: int, budget: int | None, n: int) -> None:
    """Before the passes: the gradients' memory against the budget, and what is kept."""
    kept = int(sum((b.index >= 0).sum() for b, k in zip(calls, keep_call) if k))
    what = f"per-example gradients of {n} training examples need {_gb(need)}"
    if keep_call.all():
        info(f"{what}" + ("" if budget is None else f" of the {_gb(budget)} memory budget")
             + ": all kept")
    elif not keep_call.any():
        note(f"{what}, more than the whole {_gb(budget or 0)} memory budget allows for even one "
             f"call: every training gradient is recomputed twice more (about 3x the time of "
             f"the training pass); raise the memory budget to {_gb(need)} to keep them all")
    else:
        note(f"{what}, more than the {_gb(budget or 0)} memory budget: {kept} of {n} kept, "
             f"{int((~keep_call).sum())} of {len(calls)} calls recomputed twice more; raise the "
             f"memory budget to {_gb(need)} to keep them all")


def layer_scores(model, train: Sequence[Example], val: Sequence[Example], *,
                 estimator: str = "datainf", aggregate: str = "+ve", unit: str = "tensor",
                 damping: float | None = None, damping_scale: float = 0.1,
                 per_val: bool = False, chunk_size: int = 8, memory_budget="8GB",
                 dtype=None, mesh="auto", engine: str = "packed", row_len: int | None = None,
                 bucket_multiple: int = 32, skip_zero_units: bool = False,
                 chunks_per_call: int = 4, progress: bool = False) -> LayerScores:
    """Per-example, per-layer influence scores and the LayerIF layer scores S^(l).

    model: an NNX Decoder with a (trained) LoRA adapter. train/val: tokenised
    examples (layerif_jax.data.tokenize). damping: a fixed lambda for every unit
    (default: adaptive, damping_scale * mean ||g||^2 / d per unit, as DataInf).
    dtype: compute dtype of the forward/backward (e.g. jnp.bfloat16); every
    influence sum is accumulated in float32. mesh: 'auto' shards examples over all
    devices (parameters replicated), None runs on the default device.
    engine: "packed" (several examples per row, one backward per chunk of about
    `chunk_size` examples; rows of `row_len` tokens, default twice the longest
    example) or "vmap" (vmap(grad) over length buckets of `bucket_multiple`).
    chunks_per_call: packed chunks run by one compiled call (fewer fresh temp buffers;
    the call's outputs, chunks_per_call x the per-example gradients of a chunk, must
    fit in memory at once).
    """
    t0 = time.perf_counter()
    if aggregate not in AGGREGATES:
        raise LayerIFError(f"unknown aggregate {aggregate!r} (choose from {', '.join(AGGREGATES)})")
    est = get_estimator(estimator)
    if not train or not val:
        raise LayerIFError("influence needs at least one training and one validation example")
    if damping is not None and not damping > 0:
        raise LayerIFError(f"damping must be > 0, got {damping}")
    if not damping_scale > 0:
        raise LayerIFError(f"damping scale must be > 0, got {damping_scale}")
    dtype = jnp.dtype(dtype) if dtype is not None else None
    mesh = _mesh(mesh)
    ndev = 1 if mesh is None else mesh.devices.size
    if chunk_size < 1:
        raise LayerIFError(f"chunk size must be >= 1, got {chunk_size}")
    budget = None if memory_budget is None else parse_bytes(memory_budget, "memory budget")

    runner = _Runner(model, dtype=dtype, mesh=mesh, engine=engine, chunk_size=chunk_size,
                     bucket_multiple=bucket_multiple, row_len=row_len,
                     chunks_per_call=chunks_per_call)
    _check_adapter(runner.lora)
    part = make_partition(runner.lora, unit)
    onehot = jnp.asarray(part.onehot())
    sizes = jnp.asarray(part.unit_sizes, jnp.float32)
    d_total = sum(part.unit_sizes) * part.num_layers
    n, m = len(train), len(val)
    runner.plan([train, val])
    tb, vb = runner.chunks(train), runner.chunks(val)
    offsets = np.cumsum([0] + [len(b.index) for b in tb])
    n_pad = int(offsets[-1])
    need = 4 * d_total * n_pad
    keep_call = _keep_plan(tb, 4 * d_total, budget)
    keep = bool(keep_call.all())
    _say_memory_plan(tb, keep_call, need, budget, n)

    phases = {}
    tick = time.perf_counter()

    def phase(name, *arrays):  # one sync per phase (not per chunk) for the timing breakdown
        nonlocal tick
        jax.block_until_ready(arrays)
        now = time.perf_counter()
        phases[name] = round(now - tick, 3)
        tick = now

    # -- pass 1: validation vectors -------------------------------------------------
    v_chunks, v_fin = [], []
    for b in _progress(vb, len(vb), "validation grads", progress):
        g, fin = runner.grads(b)
        leaves = jax.tree.leaves(g)
        v_chunks.append([x.astype(jnp.float32) for x in leaves] if per_val else _mean(leaves, m))
        v_fin.append(fin)
    _raise_nonfinite(v_fin, vb, "validation")
    if per_val:
        v = [jnp.concatenate(xs) for xs in zip(*v_chunks)]
    else:
        v = [sum(xs) for xs in zip(*v_chunks)]
    del v_chunks

    phase("validation", v)

    # -- pass 2: training gradients -> per-unit scalars ------------------------------
    kept, sq, vg, t_fin = [], [], [], []
    for b in _progress(tb, len(tb), "train grads", progress):
        g, fin = runner.grads(b)
        leaves = jax.tree.leaves(g)
        sq.append(_sq_norms(leaves))
        vg.append(_dots(leaves, v))
        t_fin.append(fin)
        kept.append(leaves if keep_call[len(kept)] else None)
    _raise_nonfinite(t_fin, tb, "training")
    sq_u = core.to_units(jnp.concatenate(sq), onehot)          # [n_pad, L, U]
    vg_u = core.to_units(jnp.concatenate(vg), onehot)          # [n_pad, M, L, U]

    sq_sum = jnp.sum(sq_u, 0)                                   # [L, U]
    lam = (jnp.full((part.num_layers, part.num_units), damping, jnp.float32) if damping
           else damping_scale * sq_sum / n / sizes)
    zero = np.argwhere(to_host(sq_sum) == 0)
    if len(zero) and estimator != "identity":
        if not skip_zero_units:
            l, u = zero[0]
            raise LayerIFError(
                f"{part.describe(int(l), int(u))} has an all-zero gradient over the training set "
                f"({len(zero)} such units; skip them with skip_zero_units / --skip-zero-units)")
        lam = jnp.where(sq_sum == 0, 1.0, lam)

    def chunks():
        for k, b in enumerate(_progress(tb, len(tb), "influence pass", False)):
            rows = slice(int(offsets[k]), int(offsets[k + 1]))
            yield rows, (kept[k] if kept[k] is not None else jax.tree.leaves(runner.grads(b)[0]))

    ctx = Context(part=part, n=n, v=v, sq_u=sq_u, vg_u=vg_u, lam=lam, chunks=chunks, kept=keep)

    phase("train", sq_u, vg_u)

    # -- passes 3 and 4: precondition, then score every example ---------------------
    h = est.precondition(ctx)
    phase("precondition", h)
    if h is None:
        unit_scores = vg_u
    else:
        hg = [_dots(g, h) for _, g in chunks()]
        unit_scores = core.to_units(jnp.concatenate(hg), onehot)  # [n_pad, M, L, U]
    layer_nML = to_host(jnp.sum(unit_scores, -1), np.float64)

    # back to input order, drop filler rows/columns
    t_idx = np.concatenate([b.index for b in tb])
    order_t = np.argsort(np.where(t_idx < 0, np.iinfo(np.int32).max, t_idx))[:n]
    layer_nML = layer_nML[order_t]
    per_val_layers = None
    if per_val:
        v_idx = np.concatenate([b.index for b in vb])
        order_v = np.argsort(np.where(v_idx < 0, np.iinfo(np.int32).max, v_idx))[:m]
        per_val_layers = layer_nML[:, order_v]
        per_example = per_val_layers.mean(1)
    else:
        per_example = layer_nML[:, 0]

    phase("score", layer_nML)
    seconds = time.perf_counter() - t0
    if (per_example > 0).all():
        note("every per-example score is positive: the '+ve' and 'all' layer scores are equal")
    return LayerScores(
        layer_scores=np.asarray(core.aggregate(per_example, aggregate)),
        per_example=per_example, aggregate=aggregate, estimator=est.name, unit=unit,
        n_train=n, n_val=m, lambdas=to_host(lam), unit_names=part.unit_names,
        seconds=seconds, gradients_kept=keep, per_val_layers=per_val_layers,
        meta={"engine": engine, "chunk_slots": runner.slots, "devices": ndev,
              "chunk_shapes": sorted({_chunk_shape(b) for b in tb + vb}),
              "chunks": sum(getattr(b, "num_chunks", 1) for b in tb + vb),
              "calls": len(tb) + len(vb),
              "dtype": str(dtype or model.dtype),
              "materialised_bytes": int(4 * d_total * np.diff(offsets)[keep_call].sum()),
              "needed_bytes": need,
              "kept_examples": int(sum((b.index >= 0).sum() for b, k in zip(tb, keep_call) if k)),
              "recomputed_calls": int((~keep_call).sum()),
              "damping": "adaptive" if damping is None else damping, "damping_scale": damping_scale,
              "phase_seconds": phases})
