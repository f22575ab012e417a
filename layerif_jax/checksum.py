"""Digests that tie saved state to what produced it.

* `array_digest` / `tree_digests`: SHA-256 of every saved array (dtype, shape and
  bytes), stored beside checkpoints and adapters and verified when they are read.
* `identity_digest`: a cheap identity of a large pytree (a model's base weights): the
  shapes, dtypes and an evenly strided sample of every leaf's values (at most
  `max_elems` per leaf), so any other model, dtype or fine-tune differs.
* `examples_digest`: the tokenised data, exactly (ids and loss targets, in order).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import numpy as np


def _bytes(a: np.ndarray) -> memoryview:
    a = np.ascontiguousarray(a)
    return memoryview(a.reshape(-1).view(np.uint8))


def array_digest(x) -> str:
    a = np.asarray(x)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(_bytes(a))
    return h.hexdigest()


def tree_digests(flat: Mapping[str, Any]) -> dict[str, str]:
    """{name: array_digest} for a flat {name: array} mapping (nested one level allowed)."""
    out = {}
    for k, v in flat.items():
        if isinstance(v, Mapping):
            out.update({f"{k}/{kk}": array_digest(vv) for kk, vv in v.items()})
        else:
            out[k] = array_digest(v)
    return out


def first_mismatch(flat: Mapping[str, Any], digests: Mapping[str, str]) -> str | None:
    """The name of the first array whose digest differs from `digests` (or is missing)."""
    got = tree_digests(flat)
    for k in sorted(set(got) | set(digests)):
        if got.get(k) != digests.get(k):
            return k
    return None


def nonfinite(flat: Mapping[str, Any]) -> str | None:
    """The name of the first floating array holding NaN or inf, or None."""
    for k, v in flat.items():
        if isinstance(v, Mapping):
            bad = nonfinite({f"{k}/{kk}": vv for kk, vv in v.items()})
            if bad:
                return bad
            continue
        a = np.asarray(v)
        if a.dtype.kind in "fc" or a.dtype.name == "bfloat16":
            if not np.isfinite(a.astype(np.float32) if a.dtype.name == "bfloat16" else a).all():
                return k
    return None


def identity_digest(leaves: Iterable[Any], max_elems: int = 1 << 16) -> str:
    """Shapes, dtypes and a strided sample of every leaf (device arrays sampled on device)."""
    h = hashlib.sha256()
    for x in leaves:
        shape, dtype = tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x)))
        h.update(f"{dtype}{shape};".encode())
        size = int(np.prod(shape)) if shape else 1
        stride = max(1, -(-size // max_elems))
        flat = x.reshape(-1)[::stride] if shape else x
        if not getattr(flat, "is_fully_addressable", True):   # sharded across processes
            from jax.experimental import multihost_utils
            flat = multihost_utils.process_allgather(flat, tiled=True)
        h.update(_bytes(np.asarray(flat)))
    return h.hexdigest()


def examples_digest(examples) -> str:
    """Exact digest of tokenised examples (`data.Example`: ids and targets), in order."""
    h = hashlib.sha256(str(len(examples)).encode())
    for e in examples:
        ids = np.asarray(e.ids, np.int32)
        h.update(len(ids).to_bytes(4, "little"))
        h.update(_bytes(ids))
        h.update(_bytes(np.asarray(e.targets, bool)))
    return h.hexdigest()


def file_digests(root, skip: str = "") -> dict[str, list]:
    """{relative path: [size, SHA-256]} of every file under `root` (but `skip`)."""
    from pathlib import Path

    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != skip:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[str(p.relative_to(root))] = [p.stat().st_size, h.hexdigest()]
    return out


def first_changed_file(root, digests: Mapping[str, list], skip: str = "") -> str | None:
    """What differs between the files under `root` and `digests`, or None."""
    got = file_digests(root, skip)
    for k in sorted(set(got) | set(digests)):
        if k not in got:
            return f"file {k} is missing"
        if k not in digests:
            return f"file {k} was added"
        if got[k][0] != digests[k][0]:
            return f"file {k} has {got[k][0]} bytes, {digests[k][0]} were written"
        if got[k][1] != digests[k][1]:
            return f"file {k} does not match its checksum"
    return None


def first_difference(saved: Mapping, now: Mapping, *, there: str = "there",
                     plain: Mapping[str, str] | None = None, prefix: str = "") -> str | None:
    """The first setting (keys sorted, nested mappings recursed, dotted names) whose value
    differs between what was saved and what is asked now, as "key: X <there>, Y now"; a
    top-level key in `plain` is described by its sentence instead. None when they agree.
    The one way every resume in the project says why it is refused."""
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            d = first_difference(a, b, there=there, prefix=f"{prefix}{k}.")
            if d:
                return d
        elif a != b:
            if plain and not prefix and k in plain:
                return plain[k]
            return f"{prefix}{k}: {a!r} {there}, {b!r} now"
    return None
