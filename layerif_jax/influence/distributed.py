"""Multi-process (multi-host) plumbing of the influence core.

On a pod every process runs the same program with the same model and the same
examples (`jax.distributed.initialize()` first); the mesh spans all processes'
devices. Host data goes onto that mesh with `put`, and sharded results come back to
every process with `to_host`. With one process both are plain `device_put` /
`np.asarray`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


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


def sync(tag: str) -> None:
    """A barrier of every process (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"layerif-{tag}")


def agree(ok: bool) -> bool:
    """Process 0's `ok`, in every process (one process: `ok`)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
