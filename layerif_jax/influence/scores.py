"""LayerIF layer scores: the orchestration around the pure core.

Passes (each is a loop over fixed-size chunks, one jitted call per chunk, never
over examples):

1. validation: per-example LoRA gradients, averaged into v (or kept, one v per
   validation example, with `per_val`);
2. training: per-example gradients -> ||g_i,b||^2 and v . g_i,b per unit; the
   gradients themselves are kept when n x d fits `memory_budget`;
3. the estimator's preconditioning (DataInf: one weighted gradient sum per unit);
4. scores h . g_i per unit, summed into layers.

Passes 3 and 4 stream the kept gradients, or recompute them chunk by chunk;
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

from ..data import Batch, Example, bucketed_batches
from ..errors import LayerIFError
from . import core
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
    gradients_kept: bool
    per_val_layers: np.ndarray | None = None   # [n, m, L]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_val(self) -> np.ndarray | None:
        """[n, m], summed over layers."""
        return None if self.per_val_layers is None else self.per_val_layers.sum(-1)

    def aggregated(self, how: str) -> np.ndarray:
        return np.asarray(core.aggregate(self.per_example, how))


def parse_bytes(x) -> int | None:
    """'2GB', '512MB', '1e9', 1000000 -> bytes."""
    if x is None or isinstance(x, (int, float)):
        return None if x is None else int(x)
    s = str(x).strip().upper().replace(" ", "")
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[:-len(u)]) * f)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise LayerIFError(f"cannot read memory budget {x!r} (e.g. 8GB, 512MB, 1e9)") from None


def _check_adapter(lora_state):
    bs = [x for p, x in jax.tree_util.tree_flatten_with_path(lora_state)[0]
          if "lora_b" in jax.tree_util.keystr(p)]
    if bs and all(not bool(jnp.any(b != 0)) for b in bs):
        raise LayerIFError(
            "the LoRA adapter is freshly initialised (every B is zero, so every A-gradient is "
            "zero and influence is degenerate): fine-tune it first or load a trained adapter")


def _mesh(mesh):
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if mesh == "auto":
        devs = jax.devices()
        return Mesh(np.array(devs), ("data",)) if len(devs) > 1 else None
    raise LayerIFError(f"mesh must be a jax.sharding.Mesh, 'auto' or None, got {mesh!r}")


class _Runner:
    """Runs the per-example gradient function over a set of batches."""

    def __init__(self, model, *, dtype, mesh: Mesh | None):
        graphdef, self.lora, self.rest = nnx.split(model, nnx.LoRAParam, ...)
        self.mesh = mesh
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            self.lora = jax.device_put(self.lora, rep)
            self.rest = jax.device_put(self.rest, rep)
            self._batch_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        self.fn = _compiled_grad_fn(graphdef, dtype)

    def grads(self, b: Batch):
        arrs = (b.ids, b.mask, b.targets)
        if self.mesh is not None:
            arrs = tuple(jax.device_put(a, self._batch_sharding) for a in arrs)
        return self.fn(self.lora, self.rest, *arrs)


@functools.lru_cache(maxsize=8)
def _compiled_grad_fn(graphdef, dtype):
    """One jitted gradient function per model structure and dtype (reused across calls)."""
    return jax.jit(core.per_example_grad_fn(graphdef, dtype))


_sq_norms = jax.jit(core.sq_norms)
_dots = jax.jit(core.dots)
_mean = jax.jit(core.mean_leaves, static_argnums=1)


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="chunk", leave=False)


def _raise_nonfinite(finite_chunks, batches, what):
    bad = sorted(int(i) for f, b in zip(finite_chunks, batches)
           for i, ok in zip(b.index, np.asarray(f)) if i >= 0 and not ok)
    if bad:
        raise LayerIFError(f"NaN or inf in the gradient of {what} example(s) {bad[:10]}"
                           f"{' ...' if len(bad) > 10 else ''} (index in the input order)")


def layer_scores(model, train: Sequence[Example], val: Sequence[Example], *,
                 estimator: str = "datainf", aggregate: str = "+ve", unit: str = "tensor",
                 damping: float | None = None, damping_scale: float = 0.1,
                 per_val: bool = False, chunk_size: int = 8, memory_budget="8GB",
                 dtype=None, mesh="auto", bucket_multiple: int = 32,
                 skip_zero_units: bool = False, progress: bool = False) -> LayerScores:
    """Per-example, per-layer influence scores and the LayerIF layer scores S^(l).

    model: an NNX Decoder with a (trained) LoRA adapter. train/val: tokenised
    examples (layerif_jax.data.tokenize). damping: a fixed lambda for every unit
    (default: adaptive, damping_scale * mean ||g||^2 / d per unit, as DataInf).
    dtype: compute dtype of the forward/backward (e.g. jnp.bfloat16); every
    influence sum is accumulated in float32. mesh: 'auto' shards examples over all
    devices (parameters replicated), None runs on the default device.
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
    chunk_size = -(-chunk_size // ndev) * ndev  # a multiple of the device count
    budget = parse_bytes(memory_budget)

    runner = _Runner(model, dtype=dtype, mesh=mesh)
    _check_adapter(runner.lora)
    part = make_partition(runner.lora, unit)
    onehot = jnp.asarray(part.onehot())
    sizes = jnp.asarray(part.unit_sizes, jnp.float32)
    d_total = sum(part.unit_sizes) * part.num_layers
    n, m = len(train), len(val)
    max_len = max(len(e.ids) for e in list(train) + list(val))
    tb = list(bucketed_batches(train, chunk_size, multiple=bucket_multiple, max_len=max_len))
    vb = list(bucketed_batches(val, chunk_size, multiple=bucket_multiple, max_len=max_len))
    n_pad = len(tb) * chunk_size
    M_pad = len(vb) * chunk_size if per_val else 1
    need = 4 * d_total * n_pad
    keep = budget is None or need <= budget

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

    # -- pass 2: training gradients -> per-unit scalars ------------------------------
    kept, sq, vg, t_fin = [], [], [], []
    for b in _progress(tb, len(tb), "train grads", progress):
        g, fin = runner.grads(b)
        leaves = jax.tree.leaves(g)
        sq.append(_sq_norms(leaves))
        vg.append(_dots(leaves, v))
        t_fin.append(fin)
        if keep:
            kept.append(leaves)
    _raise_nonfinite(t_fin, tb, "training")
    sq_u = core.to_units(jnp.concatenate(sq), onehot)          # [n_pad, L, U]
    vg_u = core.to_units(jnp.concatenate(vg), onehot)          # [n_pad, M, L, U]

    lam = (jnp.full((part.num_layers, part.num_units), damping, jnp.float32) if damping
           else damping_scale * jnp.sum(sq_u, 0) / n / sizes)
    zero = np.argwhere(np.asarray(jnp.sum(sq_u, 0)) == 0)
    if len(zero) and estimator != "identity":
        if not skip_zero_units:
            l, u = zero[0]
            raise LayerIFError(
                f"{part.describe(int(l), int(u))} has an all-zero gradient over the training set "
                f"({len(zero)} such units; skip them with skip_zero_units / --skip-zero-units)")
        lam = jnp.where(jnp.asarray(np.asarray(jnp.sum(sq_u, 0)) == 0), 1.0, lam)

    def chunks():
        for k, b in enumerate(tb):
            rows = slice(k * chunk_size, (k + 1) * chunk_size)
            yield rows, (kept[k] if keep else jax.tree.leaves(runner.grads(b)[0]))

    ctx = Context(part=part, n=n, v=v, sq_u=sq_u, vg_u=vg_u, lam=lam, chunks=chunks, kept=keep)

    # -- passes 3 and 4: precondition, then score every example ---------------------
    h = est.precondition(ctx)
    if h is None:
        unit_scores = vg_u
    else:
        hg = [_dots(g, h) for _, g in chunks()]
        unit_scores = core.to_units(jnp.concatenate(hg), onehot)  # [n_pad, M, L, U]
    layer_nML = np.asarray(jnp.sum(unit_scores, -1), np.float64)

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

    seconds = time.perf_counter() - t0
    return LayerScores(
        layer_scores=np.asarray(core.aggregate(per_example, aggregate)),
        per_example=per_example, aggregate=aggregate, estimator=est.name, unit=unit,
        n_train=n, n_val=m, lambdas=np.asarray(lam), unit_names=part.unit_names,
        seconds=seconds, gradients_kept=keep, per_val_layers=per_val_layers,
        meta={"chunk_size": chunk_size, "devices": ndev, "buckets": sorted({b.ids.shape[1] for b in tb + vb}),
              "dtype": str(dtype or model.dtype), "materialised_bytes": need if keep else 0,
              "damping": "adaptive" if damping is None else damping, "damping_scale": damping_scale})
