"""The progress of an influence run, saved as it goes, so that a killed run resumes.

A folder (`checkpoint_dir`) holds what the gradient passes produced so far:

* `validation/`: v, the mean validation gradient (or every validation gradient);
* `train-AAAAA-BBBBB/`, one per save, for the training calls [A, B): the per-example
  ||g||^2 and v . g, the finite flags, the gradients of the calls the memory plan
  keeps, and the running K-FAC token sums when an estimator needs them;
* `progress.json`: the fingerprint of the run (model and adapter, data, the engine's
  call layout, the memory plan, settings) and the list of complete saves with the
  digests of their small arrays.

Arrays are saved with orbax (each folder finalised atomically, asynchronously: a save
overlaps the next calls and is listed in progress.json once it has finished), the
listing last; a folder not listed is an interrupted save and is removed on resume.
A kill at any point loses at most the calls since the last listed save. A rerun with
another fingerprint is refused, naming the first difference. The estimators'
preconditioning and score passes are not saved: after a resume they run again from
the saved gradient passes (they cost a fraction of the training pass).

Multi-process: every process calls the saves and restores (orbax writes each array's
shards from the processes that hold them); process 0 writes progress.json. The folder
must be one every process sees (a shared file system or a bucket).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from .. import checksum
from ..errors import LayerIFError
from ..io import read_json, write_json
from ..notes import info
from ..sharding import data_size
from .distributed import sync, to_host

PROGRESS = "progress.json"
VERSION = 1


def _shardings(mesh):
    """(rows, replicated): the layout a restored array gets -- split over the examples'
    mesh axis for per-example arrays, whole on every device otherwise."""
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        return one, one
    return NamedSharding(mesh, P(mesh.axis_names[0])), NamedSharding(mesh, P())


def _small(tree: dict) -> dict:
    """The arrays whose digests are kept (everything but the gradients)."""
    return {k: v for k, v in tree.items() if k != "g"}


def _host_flat(tree: dict) -> dict:
    """{"a/b": host array} of a nested tree (arrays spanning processes gathered)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in _host_flat(v).items()})
        else:
            out[k] = to_host(v)
    return out


def _layout(tree) -> Any:
    """{name: [shape, dtype, rows?]} of a saved tree, for an abstract restore."""
    if isinstance(tree, dict):
        return {k: _layout(v) for k, v in tree.items()}
    return [list(tree.shape), str(tree.dtype)]


class Checkpoint:
    """The progress folder of one run; see the module docstring.

    `every`: training calls between saves. Use: `open(fingerprint)` before the passes
    (refuses another run's folder), then `validation()` / `save_validation(v)` and
    `train_segments()` / `train_step(...)` / `finish_train()` around the passes.
    """

    def __init__(self, path: str | Path, every: int = 8, *,
                 hint: str = "give another checkpoint dir (or remove it)", on_create=None):
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise LayerIFError(f"checkpoint every must be an integer >= 1 (training calls), "
                               f"got {every!r}")
        self.path = Path(path).expanduser().absolute()
        self.every = int(every)
        self.hint = hint
        self.on_create = on_create   # called before the folder is made (e.g. OutputDir.claim)
        self.meta: dict = {}
        self._pending = None      # (name, record) of the save in flight
        self._buffer: list = []   # the calls since the last save
        self._ckpt = None
        self.mesh = None
        self.resumed_calls = 0   # training calls restored rather than recomputed

    # -- opening ----------------------------------------------------------------------
    def open(self, fingerprint: dict, mesh) -> "Checkpoint":
        self.mesh = mesh
        fingerprint = {"version": VERSION, **fingerprint}
        if self.path.exists() and not self.path.is_dir():
            raise LayerIFError(f"checkpoint dir {self.path} exists and is not a directory")
        meta = None
        if self.path.is_dir() and any(self.path.iterdir()):
            if not (self.path / PROGRESS).is_file():
                raise LayerIFError(f"checkpoint dir {self.path} holds files but no {PROGRESS}: "
                                   "it is not an influence run's progress; give another folder")
            try:
                meta = read_json(self.path / PROGRESS)
            except Exception as e:  # noqa: BLE001 - damaged or foreign JSON
                raise LayerIFError(f"cannot read {self.path / PROGRESS}: "
                                   f"{str(e).splitlines()[0]}") from None
        sync("resume-looked")   # every process has looked before any writes
        if meta is not None:
            saved = meta.get("fingerprint", {})
            # what the run is about (model, data) before how it was laid out
            diff = checksum.first_difference(
                {k: saved.get(k) for k in ("version", "identity")},
                {k: fingerprint.get(k) for k in ("version", "identity")},
                there="in the checkpoint") or checksum.first_difference(
                saved, fingerprint, there="in the checkpoint")
            if diff:
                raise LayerIFError(f"{self.path} holds the progress of another influence run "
                                   f"({diff}); {self.hint}")
            self.meta = meta
            listed = {PROGRESS} | {s["name"] for s in meta.get("train", [])} | (
                {"validation"} if meta.get("validation") else set())
            if jax.process_index() == 0:
                for p in self.path.iterdir():  # interrupted saves of this run
                    if p.name not in listed:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            done = self.meta.get("train", [])
            if self.meta.get("validation") or done:
                info(f"resuming the influence run in {self.path}: validation pass "
                     f"{'done' if self.meta.get('validation') else 'to do'}, "
                     f"{done[-1]['end'] if done else 0} training calls done")
        else:
            self.meta = {"fingerprint": fingerprint, "validation": None, "train": []}
            if jax.process_index() == 0:
                if self.on_create is not None:
                    self.on_create()
                self.path.mkdir(parents=True, exist_ok=True)
                write_json(self.path / PROGRESS, self.meta)
        sync("resume-opened")
        return self

    def _checkpointer(self):
        if self._ckpt is None:
            import orbax.checkpoint as ocp
            self._ckpt = ocp.StandardCheckpointer()
        return self._ckpt

    def _write_meta(self) -> None:
        if jax.process_index() == 0:
            write_json(self.path / PROGRESS, self.meta)
        sync("resume-meta")

    def _restore(self, record: dict) -> dict:
        rows, rep = _shardings(self.mesh)

        def abstract(layout, key):
            if isinstance(layout, dict):
                return {k: abstract(v, key or k) for k, v in layout.items()}
            shape, dtype = layout
            sharding = rep if key in ("v", "sums") or not shape else rows
            if sharding is rows and self.mesh is not None and shape[0] % data_size(self.mesh):
                sharding = rep
            return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)

        where = self.path / record["name"]
        try:
            tree = self._checkpointer().restore(where, abstract(record["layout"], None))
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise LayerIFError(f"cannot read the saved progress in {where}: "
                               f"{str(e).splitlines()[0]}; {self.hint}") from None
        bad = checksum.first_mismatch(_host_flat(_small(tree)), record["digests"])
        if bad is not None:
            raise LayerIFError(f"the saved progress in {where} is damaged (checksum mismatch in "
                               f"{bad}); {self.hint}")
        return tree

    def _save(self, name: str, tree: dict, extra: dict) -> dict:
        record = {"name": name, "layout": _layout(tree),
                  "digests": checksum.tree_digests(_host_flat(_small(tree))), **extra}
        self._checkpointer().save(self.path / name, tree)
        return record

    # -- the validation pass ------------------------------------------------------------
    def validation(self) -> list | None:
        rec = self.meta.get("validation")
        if not rec:
            return None
        v = self._restore(rec)["v"]
        return [v[f"{k:03d}"] for k in range(len(v))]

    def save_validation(self, v: list) -> None:
        rec = self._save("validation", {"v": {f"{k:03d}": x for k, x in enumerate(v)}}, {})
        self._checkpointer().wait_until_finished()
        self.meta["validation"] = rec
        self._write_meta()

    # -- the training pass --------------------------------------------------------------
    def train_done(self) -> int:
        """Training calls already saved."""
        done = self.meta.get("train", [])
        self.resumed_calls = done[-1]["end"] if done else 0
        return self.resumed_calls

    def train_segments(self) -> Iterator[tuple[list, list, list, list, list | None]]:
        """Per saved segment: (sq per call, vg per call, finite per call, kept gradients or
        None per call, the K-FAC token sums at its end or None)."""
        for rec in self.meta.get("train", []):
            t = self._restore(rec)
            k = rec["end"] - rec["start"]
            g = t.get("g", {})
            kept = [[g[f"c{c:05d}"][f"{j:03d}"] for j in range(len(g[f"c{c:05d}"]))]
                    if f"c{c:05d}" in g else None for c in range(k)]
            sums = t.get("sums")
            yield ([t["sq"][f"c{c:05d}"] for c in range(k)],
                   [t["vg"][f"c{c:05d}"] for c in range(k)],
                   [t["fin"][f"c{c:05d}"] for c in range(k)], kept,
                   None if sums is None else [sums[f"{j:03d}"] for j in range(len(sums))])

    def train_step(self, k: int, sq, vg, fin, kept, sums) -> None:
        """Call k of the training pass finished: saved every `every` calls."""
        self._buffer.append((sq, vg, fin, kept))
        if len(self._buffer) >= self.every:
            self._flush(k + 1, sums)

    def finish_train(self, total: int, sums) -> None:
        """The last calls' save is started; it is listed by `settle` / `close`, so its
        writing overlaps the estimators' passes."""
        if self._buffer:
            self._flush(total, sums)

    def _flush(self, end: int, sums) -> None:
        start = end - len(self._buffer)
        tree = {"sq": {f"c{c:05d}": b[0] for c, b in enumerate(self._buffer)},
                "vg": {f"c{c:05d}": b[1] for c, b in enumerate(self._buffer)},
                "fin": {f"c{c:05d}": b[2] for c, b in enumerate(self._buffer)}}
        g = {f"c{c:05d}": {f"{j:03d}": x for j, x in enumerate(b[3])}
             for c, b in enumerate(self._buffer) if b[3] is not None}
        if g:
            tree["g"] = g
        if sums is not None:
            tree["sums"] = {f"{j:03d}": x for j, x in enumerate(sums)}
        self._complete_pending()   # the previous save, finished while these calls ran
        self._pending = self._save(f"train-{start:05d}-{end:05d}", tree,
                                   {"start": start, "end": end})
        self._buffer = []

    def _complete_pending(self) -> None:
        if self._pending is None:
            return
        self._checkpointer().wait_until_finished()
        self.meta["train"] = self.meta.get("train", []) + [self._pending]
        self._pending = None
        self._write_meta()

    def settle(self) -> None:
        """List the save in flight once it has finished (after a clean stop too)."""
        self._complete_pending()

    def close(self) -> None:
        self._complete_pending()
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None


__all__ = ["Checkpoint", "PROGRESS"]
