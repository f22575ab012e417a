"""Multi-process (multi-host) plumbing of the influence core.

On a pod every process runs the same program with the same model
(`jax.distributed.initialize()` first); the mesh spans all processes' devices. Host
data goes onto that mesh with `put`, and sharded results come back to every process
with `to_host`. With one process both are plain `device_put` / `np.asarray`.

Examples: every process may pass the whole example set, or only its share of it (an
`ExampleShard`, `shard_indices` says which): then each process reads, tokenises, packs
and puts only its own examples onto its own devices' rows, and only their lengths,
digests and the packing's layout are exchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class ExampleShard:
    """This process's share of an example set in a multi-process run: its examples (in
    the order of `index`), their indices in the whole set, and the whole set's size.
    `layer_scores` (packed engine) takes one in place of the whole list, in every process
    (`shard_indices` gives the indices to read)."""
    examples: Sequence[Any]
    index: np.ndarray
    total: int

    def __post_init__(self):
        if len(self.examples) != len(self.index):
            raise ValueError(f"an example shard of {len(self.examples)} examples has "
                             f"{len(self.index)} indices")


def data_blocks(mesh) -> list[int] | None:
    """The processes in the order of their blocks of the mesh's data axis, where every
    process holds whole rows of the data axis (its model axis within the process), the
    same number each, in one contiguous block; None with one process, no mesh, or
    another layout (then every process reads every example)."""
    if mesh is None or jax.process_count() == 1:
        return None
    devs = mesh.devices if mesh.devices.ndim == 2 else mesh.devices.reshape(-1, 1)
    owners = []
    for row in devs:                    # one data position: its devices' processes
        procs = {d.process_index for d in row}
        if len(procs) != 1:
            return None
        owners.append(procs.pop())
    blocks = [o for k, o in enumerate(owners) if k == 0 or owners[k - 1] != o]
    if (len(blocks) != len(set(blocks)) or len(blocks) != jax.process_count()
            or len({owners.count(o) for o in blocks}) != 1):
        return None
    return blocks


def data_share(mesh) -> tuple[int, int] | None:
    """(g, G): this process's place among the G processes that split the examples
    (`data_blocks`), or None: every process reads every example."""
    blocks = data_blocks(mesh)
    return None if blocks is None else (blocks.index(jax.process_index()), len(blocks))


def shard_indices(total: int, mesh) -> np.ndarray | None:
    """The indices (of `total` examples) this process reads in a multi-process run over
    `mesh` (every G-th from its place g, `data_share`), or None: every example."""
    share = data_share(mesh)
    return None if share is None else np.arange(share[0], total, share[1])


def gather_host(x: np.ndarray) -> list[np.ndarray]:
    """Every process's host array (lengths along axis 0 may differ), in process order."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return [x]
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(x.shape[0]))).reshape(-1)
    pad = np.zeros((int(sizes.max()), *x.shape[1:]), x.dtype)
    pad[:x.shape[0]] = x
    every = np.asarray(multihost_utils.process_allgather(pad))
    return [every[p, :int(k)] for p, k in enumerate(sizes)]


def shard_digest(shard: ExampleShard, digest) -> str:
    """One digest of an example set read in shards: every process's `digest(examples)`
    and indices, in process order (the same string in every process)."""
    local = hashlib.sha256(digest(shard.examples).encode())
    local.update(np.asarray(shard.index, np.int64).tobytes())
    raw = np.frombuffer(local.digest(), np.uint8)
    h = hashlib.sha256(str(shard.total).encode())
    for d in gather_host(raw):
        h.update(d.tobytes())
    return h.hexdigest()


def put(tree, sharding):
    """Host data that is identical in every process -> arrays laid out as `sharding` (one
    sharding for every leaf, or a tree of them like `tree`). Across processes each
    process makes only the shards its own devices hold."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    if jax.process_count() == 1 or all(s.is_fully_addressable for s in jax.tree.leaves(sharding)):
        return jax.device_put(tree, sharding)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:   # already global
            return x if x.sharding.is_equivalent_to(s, x.ndim) else jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, sharding)


def to_host(x, dtype=None) -> np.ndarray:
    """The whole value of a (possibly process-spanning) array, in every process."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype)


def _paced() -> bool:
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def pace(tree):
    """`tree`, once it is computed, in a multi-process run on CPU (elsewhere at once).

    The loops over calls wait here once per call, so the host never runs far ahead of
    the devices. XLA:CPU lets at most 32 computations per device be in flight; a
    computation with collectives is launched only after the one before it, and the
    computations queued behind it keep their places while they wait for its result.
    With more than 32 of them queued the waiting collective never gets a place: both
    processes hang (seen with gloo: a streamed DataInf pass, its collective waiting
    behind the adds of the following calls). One wait per call costs nothing against
    the call's forward and backward."""
    if _paced():
        jax.block_until_ready(tree)
    return tree


def _add_leaves(acc, x):
    return jax.tree.map(jnp.add, acc, x)


_add = jax.jit(_add_leaves)
_add_in_place = jax.jit(_add_leaves, donate_argnums=0)


def accumulate(acc, x, donate: bool = True):
    """acc + x leaf by leaf in one computation (acc None: x itself), paced (`pace`): the
    running sum of a loop over calls. With `donate` acc's buffers are reused, so the x
    that started the sum is consumed by the next call (pass fresh results, or
    donate=False where something else still holds them)."""
    return pace(x if acc is None else (_add_in_place if donate else _add)(acc, x))


def sync(tag: str) -> None:
    """A barrier of every process (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"layerif-{tag}")


def agree(ok: bool) -> bool:
    """Process 0's `ok`, in every process (one process: `ok`)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
