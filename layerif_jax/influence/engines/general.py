"""Per-example gradients of ANY loss: `vmap(grad)` over fixed-shape chunks of a dataset.

The dataset is a pytree of arrays with a leading example axis; an example is one
slice of it along that axis. A chunk holds `chunk_size` examples (a multiple of the
devices): the last one is filled with copies of its first example, weighted 0 in the
loss, so their gradients are exactly zero and every chunk has one shape (one
compilation). Several datasets (e.g. one per length bucket) give one shape each.

Only the attributed leaves of `params` (see `partition`) are differentiated; the
others enter the loss as constants. Gradients come back in piece form.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ...errors import LayerIFError
from .. import core
from ..distributed import accumulate, put
from ..partition import Partition


@dataclasses.dataclass(frozen=True)
class Chunk:
    arrays: Any          # pytree of host arrays, leaves [B, ...]
    weight: np.ndarray   # float32 [B]: 1 for a real example, 0 for a filler copy
    index: np.ndarray    # int32 [B]: position in the input, -1 for a filler

    @property
    def tokens(self) -> int:  # the cost of recomputing it, for the memory plan
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.arrays)))

    @property
    def shape(self) -> tuple:
        return tuple(tuple(x.shape) for x in jax.tree.leaves(self.arrays))


def num_examples(data) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise LayerIFError("the dataset has no arrays")
    ns = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(ns) != 1 or -1 in ns:
        raise LayerIFError(f"every array of a dataset needs the same leading example axis, "
                           f"got leading sizes {sorted(ns)}")
    return ns.pop()


def chunk_dataset(data, size: int, offset: int = 0) -> list[Chunk]:
    """Fixed-shape chunks of `size` examples (indices `offset` + position)."""
    n = num_examples(data)
    host = jax.tree.map(np.asarray, data)
    out = []
    for s in range(0, n, size):
        idx = np.arange(s, min(s + size, n))
        take = np.concatenate([idx, np.full(size - len(idx), idx[0])])
        out.append(Chunk(jax.tree.map(lambda x: x[take], host),
                         (np.arange(size) < len(idx)).astype(np.float32),
                         np.where(np.arange(size) < len(idx), take + offset, -1).astype(np.int32)))
    return out


CURVATURES = ("empirical_fisher", "gauss_newton", "true_fisher", "hessian")
TRUE_FISHER_SEED = 0


class OutputLoss(NamedTuple):
    """A loss split at the model's output, for the Gauss-Newton and true Fisher
    curvatures: `output(params, example)` -> outputs (any pytree, e.g. logits),
    `loss(outputs, example)` -> scalar, convex in the outputs. Called as a whole it is
    the loss of one example. `sample(outputs, example, key)` -> the example with its
    label drawn from the model's predictive distribution at `outputs` (the true Fisher,
    "true_fisher"; `sample_label` makes one for a categorical label)."""
    output: Callable
    loss: Callable
    sample: Callable | None = None

    def __call__(self, params, *args):
        """(params, example), or (params, const, example) where the engine has a `const`
        (an NNX model's frozen rest): `output` takes the same arguments."""
        return self.loss(self.output(params, *args), args[-1])


def sample_label(key_name: str) -> Callable:
    """An `OutputLoss.sample` for a classifier: example[key_name] replaced by a class
    drawn from softmax(outputs) (outputs: the logits, classes on the last axis)."""
    def sample(logits, example, key):
        return {**example, key_name: jax.random.categorical(key, logits).astype(
            jnp.asarray(example[key_name]).dtype)}
    return sample


def example_key(seed: int, index) -> jax.Array:
    """The true Fisher's key of input example `index` (fillers, index -1, take 0's)."""
    return jax.random.fold_in(jax.random.key(seed), jnp.maximum(index, 0))


def draw_next_tokens(keys, positions, logits) -> jax.Array:
    """Tokens drawn from softmax(logits [N, V]), one per position: position p [N] of the
    example whose key is keys [N] (or one key for all) takes u ~ U(0, 1) from fold_in(key, p) and the first token
    whose cumulative probability exceeds u (inverse CDF, float32). Each draw depends on
    the example, the position and the logits only, not on padding, packing or chunking:
    both engines draw the same labels for an example (`layer_scores(curvature="true_fisher")`
    on the vmap engine and K-FAC's factors on the packed one)."""
    def one(key, pos, lg):
        u = jax.random.uniform(jax.random.fold_in(key, pos))
        c = jnp.cumsum(jax.nn.softmax(lg.astype(jnp.float32)))
        return jnp.minimum(jnp.sum(c < u * c[-1]), lg.shape[-1] - 1).astype(jnp.int32)
    return jax.vmap(one, in_axes=(0 if keys.ndim else None, 0, 0))(
        keys, positions, jax.lax.stop_gradient(logits))


def check_curvature(loss_fn, kind: str) -> None:
    """Refuse a curvature the loss cannot give (before any work)."""
    if kind == "gauss_newton" and not isinstance(loss_fn, OutputLoss):
        raise LayerIFError("curvature='gauss_newton' needs the loss split at the model's "
                           "output: pass loss_fn=OutputLoss(output_fn, loss_of_output)")
    if kind == "true_fisher" and getattr(loss_fn, "sample", None) is None:
        raise LayerIFError("curvature='true_fisher' draws labels from the model: pass "
                           "loss_fn=OutputLoss(output_fn, loss_of_output, sample) (for a "
                           "class label: sample=sample_label('y'))")


class GeneralEngine:
    """`vmap(grad(loss_fn))` over the chunks: `loss_fn(params, example) -> scalar`, or
    `loss_fn(params, const, example)` when `const` (e.g. the frozen rest of an NNX
    model) is given; only the attributed leaves of `params` are differentiated."""

    name = "vmap"

    def __init__(self, loss_fn: Callable, params, part: Partition, *, mesh: Mesh | None,
                 chunk_size: int, const=None):
        leaves, treedef = jax.tree.flatten(params)
        attr = set(part.leaf_index)
        self.loss_fn, self.treedef, self.attr = loss_fn, treedef, tuple(part.leaf_index)
        self.n_leaves, self.stacked = len(leaves), tuple(part.leaf_stacked)
        self.params = [leaves[i] for i in part.leaf_index]
        self.frozen = [x for i, x in enumerate(leaves) if i not in attr]
        self.const = const
        self.mesh = mesh
        self.ndev = 1 if mesh is None else mesh.devices.size
        self.slots = -(-chunk_size // self.ndev) * self.ndev
        self.fn = _compiled(loss_fn, treedef, tuple(part.leaf_index), len(leaves),
                            tuple(part.leaf_stacked), const is not None)
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            self.params, self.frozen = put(self.params, rep), put(self.frozen, rep)
            self.const = put(const, rep) if const is not None else None
            self._shard = NamedSharding(mesh, P(mesh.axis_names[0]))

    def plan(self, example_sets) -> None:
        pass  # every chunk has the shape of its dataset

    def chunks(self, data) -> list[Chunk]:
        """`data`: a dataset, or a list of (dataset, input indices) pairs (buckets)."""
        if isinstance(data, list):
            out = []
            for ds, idx in data:
                for c in chunk_dataset(ds, self.slots):
                    out.append(dataclasses.replace(
                        c, index=np.where(c.index >= 0, np.asarray(idx)[np.maximum(c.index, 0)],
                                          -1).astype(np.int32)))
            return out
        return chunk_dataset(data, self.slots)

    def grads(self, c: Chunk):
        arrays, weight = c.arrays, c.weight
        if self.mesh is not None:
            arrays, weight = put(arrays, self._shard), put(weight, self._shard)
        return self.fn(self.params, self.frozen, self.const, arrays, weight)

    def curvature_product(self, kind: str, x, piece_unit: np.ndarray, chunks: Sequence[Chunk]):
        """sum over `chunks` of the per-unit (block-diagonal) curvature products
        sum_i w_i C_i,b x_b, C = the Hessian of the loss ("hessian"), J^T H_out J
        ("gauss_newton", with an `OutputLoss`) or g~ g~^T at a label drawn from the model
        ("true_fisher", an `OutputLoss` with `sample`); x leaves [M, P_k, ...] in piece
        form, piece_unit [P]: the (layer, unit) index of every piece. One forward-over-reverse
        (or JVP + VJP) product per (unit, validation row), batched; the true Fisher: one
        gradient per example, dotted with every x."""
        check_curvature(self.loss_fn, kind)
        J = int(piece_unit.max()) + 1
        mask = jnp.asarray(np.arange(J)[:, None] == piece_unit[None], jnp.float32)    # [J, P]
        if kind == "true_fisher":
            fn = _true_fisher_compiled(self.loss_fn, self.treedef, self.attr, self.n_leaves,
                                       self.stacked, self.const is not None, TRUE_FISHER_SEED)
        else:
            fn = _curvature_compiled(self.loss_fn, self.treedef, self.attr, self.n_leaves,
                                     self.stacked, self.const is not None, kind)
        acc = None
        for c in chunks:
            arrays, weight = c.arrays, c.weight
            extra = (jnp.asarray(c.index),) if kind == "true_fisher" else ()
            if self.mesh is not None:
                arrays, weight = put(arrays, self._shard), put(weight, self._shard)
                extra = tuple(put(e, self._shard) for e in extra)
            acc = accumulate(acc, fn(self.params, self.frozen, self.const, arrays, weight,
                                     *extra, x, mask))
        return acc

    def describe(self, calls: Sequence[Chunk]) -> dict[str, Any]:
        return {"chunk_slots": self.slots, "chunk_shapes": sorted({c.shape for c in calls}),
                "chunks": len(calls)}


def _assembly(treedef, attr: tuple, n_leaves: int, with_const: bool):
    """(params_of, consts): params_of(attributed leaves, frozen leaves) -> the whole
    parameter pytree; consts(const) -> the loss's arguments between params and example
    ((const,) where the engine has one, else ())."""
    pos = {i: k for k, i in enumerate(attr)}

    def params_of(attr_leaves, frozen_leaves):
        it = iter(frozen_leaves)
        return jax.tree.unflatten(treedef, [attr_leaves[pos[i]] if i in pos else next(it)
                                            for i in range(n_leaves)])
    return params_of, (lambda const: (const,) if with_const else ())


@functools.lru_cache(maxsize=16)
def _compiled(loss_fn, treedef, attr: tuple, n_leaves: int, stacked: tuple, with_const: bool):
    """One jitted per-example gradient function per loss and parameter structure."""
    params_of, consts = _assembly(treedef, attr, n_leaves, with_const)

    def one(attr_leaves, frozen_leaves, const, example, w):
        return w * loss_fn(params_of(attr_leaves, frozen_leaves), *consts(const), example)

    per_example = jax.vmap(jax.grad(one), in_axes=(None, None, None, 0, 0))

    def fn(attr_leaves, frozen_leaves, const, arrays, weight):
        g = core.to_pieces(per_example(attr_leaves, frozen_leaves, const, arrays, weight),
                           stacked)
        B = weight.shape[0]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x.reshape(B, -1)), axis=1)
                                    for x in g]), axis=0)
        return g, finite

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _curvature_compiled(loss_fn, treedef, attr: tuple, n_leaves: int, stacked: tuple,
                        with_const: bool, kind: str):
    params_of, consts = _assembly(treedef, attr, n_leaves, with_const)

    def one_loss(attr_leaves, frozen, const, example):
        return loss_fn(params_of(attr_leaves, frozen), *consts(const), example)

    def hessian(attr_leaves, frozen, const, arrays, weight, t):
        def total(a):
            per = jax.vmap(one_loss, in_axes=(None, None, None, 0))(a, frozen, const, arrays)
            return jnp.sum(weight * per)
        return jax.jvp(jax.grad(total), (attr_leaves,), (t,))[1]

    def gauss_newton(attr_leaves, frozen, const, arrays, weight, t):
        def one(example, w):
            out = lambda a: loss_fn.output(params_of(a, frozen), *consts(const),  # noqa: E731
                                           example)
            o, jt = jax.jvp(out, (attr_leaves,), (t,))
            ht = jax.jvp(jax.grad(lambda q: loss_fn.loss(q, example)), (o,), (jt,))[1]
            return jax.tree.map(lambda r: w * r, jax.vjp(out, attr_leaves)[1](ht)[0])
        per = jax.vmap(one)(arrays, weight)
        return [jnp.sum(r, 0) for r in per]

    product = hessian if kind == "hessian" else gauss_newton

    def fn(attr_leaves, frozen, const, arrays, weight, x, mask):
        off = np.cumsum([0] + [xk.shape[1] for xk in x])
        # one tangent per (unit j, row m): x restricted to unit j's pieces
        tang = [xk[None] * mask[:, None, off[k]:off[k + 1]].reshape(
                    mask.shape[:1] + (1, xk.shape[1]) + (1,) * (xk.ndim - 2))
                for k, xk in enumerate(x)]                            # [J, M, P_k, ...]
        J, M = mask.shape[0], x[0].shape[0]
        flat = [t.reshape((J * M,) + t.shape[2:]) for t in tang]
        as_params = [t if s else t[:, 0] for t, s in zip(flat, stacked)]
        res = jax.vmap(lambda t: product(attr_leaves, frozen, const, arrays, weight, t))(
            as_params)
        res = core.to_pieces(res, stacked)                              # [J*M, P_k, ...]
        return [jnp.einsum("jp,jmp...->mp...", mask[:, off[k]:off[k + 1]],
                           r.reshape((J, M) + r.shape[1:]).astype(jnp.float32))
                for k, r in enumerate(res)]

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _true_fisher_compiled(loss_fn: OutputLoss, treedef, attr: tuple, n_leaves: int,
                          stacked: tuple, with_const: bool, seed: int):
    """sum_i w_i g~_i (g~_i . x_b) per unit, g~_i the gradient at a label drawn from the
    model (`loss_fn.sample`), the key folded from `seed` and the example's index: the
    same labels in every product of a run (a fixed operator for the solvers) and in any
    chunking. E over the draws of g~ g~^T is the Gauss-Newton matrix for a loss that is
    a negative log-likelihood (cross-entropy, Gaussian)."""
    params_of, consts = _assembly(treedef, attr, n_leaves, with_const)

    def one(attr_leaves, frozen, const, example, i):
        out = loss_fn.output(params_of(attr_leaves, frozen), *consts(const), example)
        key = example_key(seed, i)
        drawn = loss_fn.sample(jax.tree.map(jax.lax.stop_gradient, out), example, key)
        return loss_fn.loss(out, drawn)

    per_example = jax.vmap(jax.grad(one), in_axes=(None, None, None, 0, 0))

    def fn(attr_leaves, frozen, const, arrays, weight, index, x, mask):
        g = core.to_pieces(per_example(attr_leaves, frozen, const, arrays, index), stacked)
        d = jnp.einsum("bmj,jp->bmp", jnp.einsum("bmp,jp->bmj", core.dots(g, x), mask), mask)
        return core.weighted_sum(weight[:, None, None] * d, g)   # per piece: w (g~ . x)_b g~

    return jax.jit(fn)


def clear_cache() -> None:
    _compiled.cache_clear()
    _curvature_compiled.cache_clear()
    _true_fisher_compiled.cache_clear()
