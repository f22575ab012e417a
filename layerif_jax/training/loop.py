"""The epoch / step loop shared by LoRA fine-tuning and LoRA-MoE training: checkpoints
(checksummed, resumable only by the same run), stops, the run's output folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checksum
from ..data import Example, bucket_length, epoch_batches
from ..errors import LayerIFError
from ..io import OutputDir, write_json
from ..notes import info, note
from ..stop import check as check_stop
from .config import TrainConfig, lr_at

__all__ = ["CHECKPOINT_DIR", "FILE_SUMS", "ADAPTER_DIR", "STATE_FILE", "HISTORY_FILE",
           "fit_examples", "pad_length", "run_fingerprint", "LoopResult", "train_loop",
           "finish_run", "run_dir", "RunData", "prepare_run", "float32_master", "cast_like"]

CHECKPOINT_DIR = "checkpoints"
FILE_SUMS = "layerif_files.sha256.json"  # in each checkpoint folder, beside orbax's files
ADAPTER_DIR = "adapter"
STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"


def fit_examples(examples: Sequence[Example], max_len: int, what: str) -> list[Example]:
    """Truncate to max_len (the padded length is fixed, so longer examples cannot fit)."""
    out = []
    for i, ex in enumerate(examples):
        if len(ex.ids) > max_len:
            ex = Example(ex.ids[:max_len], ex.targets[:max_len])
        if len(ex.ids) < 2 or not np.asarray(ex.targets)[1:].any():
            raise LayerIFError(f"{what} example {i} has no token that counts in the loss "
                               f"(after truncation to {max_len} tokens)")
        out.append(ex)
    return out


def pad_length(examples: Sequence[Example], max_len: int) -> int:
    return bucket_length(max(len(e.ids) for e in examples), 8, max_len)


def _micro(batch, cfg: TrainConfig):
    A, B = cfg.grad_accum, cfg.batch_size
    T = batch.ids.shape[1]
    return (batch.ids.reshape(A, B, T), batch.mask.reshape(A, B, T),
            batch.targets.reshape(A, B, T), batch.index.reshape(A, B))


def run_fingerprint(cfg: TrainConfig, train: Sequence[Example], total_steps: int, *,
                    model_config, base, init, **settings) -> dict[str, Any]:
    """Everything a checkpoint must share with the run that resumes it: the training
    settings (not checkpoint_every / keep, which do not change the trajectory), the
    tokenised data (exact digest), the base model (its config, and an identity digest
    of its weights: shapes, dtypes and a strided sample of the values), the initial
    trainable state (the same kind of digest), and the caller's `settings` (LoRA or
    MoE configuration)."""
    import hashlib

    c = dataclasses.asdict(cfg)
    for k in ("checkpoint_every", "keep"):
        c.pop(k)
    config = json.dumps(dataclasses.asdict(model_config), sort_keys=True, default=str)
    base_id = hashlib.sha256((config + checksum.identity_digest(jax.tree.leaves(base)))
                             .encode()).hexdigest()
    return {"train": c, **settings, "n_train": len(train), "total_steps": total_steps,
            "data": checksum.examples_digest(train), "base_model": base_id,
            "init": checksum.identity_digest(jax.tree.leaves(init))}


_WHAT = {"data": "the training data differs (another file, --limit, --max-len or "
                 "--mask-prompt)",
         "base_model": "the base model differs (another checkpoint, config or --dtype)",
         "init": "the initial adapter differs (another --seed or initialisation)"}


def _flat(tree) -> dict[str, Any]:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _unflat(like, flat: dict[str, Any]):
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise LayerIFError(f"checkpoint holds {len(flat)} arrays, this run expects {len(leaves)}")
    new = []
    for i, ref in enumerate(leaves):
        # via host memory: a restored array is committed to a device, a fresh one is not,
        # and that difference alone would make jit compile the step a second time
        x = jnp.asarray(np.asarray(flat[f"{i:05d}"]))
        if x.shape != ref.shape:
            raise LayerIFError(f"checkpoint array {i} has shape {x.shape}, expected {ref.shape}")
        new.append(x.astype(ref.dtype))
    return jax.tree.unflatten(treedef, new)


def _oneline(e: BaseException, limit: int = 160) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return msg if len(msg) <= limit else msg[:limit] + "..."


@dataclasses.dataclass
class LoopResult:
    params: Any
    opt_state: Any
    history: dict[str, Any]
    step: int
    total: int
    resumed_from: int | None


def _restore(mngr, params, opt_state, fingerprint: dict, state_key: str, where: Path):
    """(params, opt_state, meta) of the newest intact checkpoint, or None when there is
    none. A checkpoint of another run is refused; a damaged one (unreadable, a checksum
    that does not match, non-finite values) is skipped with a note naming it."""
    import orbax.checkpoint as ocp

    damaged: list[tuple[int, str]] = []
    for s in sorted(mngr.all_steps(), reverse=True):
        sums = Path(mngr.directory) / str(s) / FILE_SUMS
        if sums.is_file():  # verified before orbax reads a byte (it cannot fail noisily then)
            try:
                bad = checksum.first_changed_file(sums.parent, json.loads(sums.read_text()),
                                                  skip=FILE_SUMS)
            except (OSError, ValueError) as e:
                bad = f"unreadable {FILE_SUMS}: {e}"
            if bad is not None:
                damaged.append((s, bad))
                continue
        try:
            meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError("no step in its metadata")
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            damaged.append((s, f"unreadable metadata: {_oneline(e)}"))
            continue
        diff = checksum.first_difference(meta.get("fingerprint", {}), fingerprint,
                                         there="in the checkpoint", plain=_WHAT)
        if diff:
            raise LayerIFError(f"{where} holds checkpoints of a different run ({diff}); "
                               f"use another output directory or delete {CHECKPOINT_DIR}/")
        template = {state_key: _flat(params), "opt": _flat(opt_state)}
        try:
            state = mngr.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template)))["state"]
            host = jax.tree.map(np.asarray, dict(state))
        except Exception as e:  # noqa: BLE001
            damaged.append((s, f"unreadable arrays: {_oneline(e)}"))
            continue
        bad = checksum.first_mismatch(host, meta.get("digests") or {})
        if bad is not None:
            damaged.append((s, f"checksum mismatch in {bad}"))
            continue
        bad = checksum.nonfinite(host)
        if bad is not None:
            damaged.append((s, f"non-finite values in {bad}"))
            continue
        for d, why in damaged:  # newer than `s`: the resumed run writes that step again
            mngr.delete(d)
            note(f"checkpoint {d} in {where / CHECKPOINT_DIR} is damaged ({why}); resuming "
                 f"from checkpoint {s} instead (the damaged one is removed)")
        return (_unflat(params, host[state_key]), _unflat(opt_state, host["opt"]), meta)
    if damaged:
        raise LayerIFError(f"no intact checkpoint in {where / CHECKPOINT_DIR} ("
                           + "; ".join(f"{s}: {why}" for s, why in damaged)
                           + f"); delete {CHECKPOINT_DIR}/ to start over")
    return None


def _open(out_dir: Path, cfg: TrainConfig, params, opt_state, fingerprint, state_key: str,
          history: dict[str, Any], total: int, desc: str):
    """The checkpoint manager and the state to start from: (manager, params, opt_state,
    history, step, resumed_from). A finished or partial run of the same fingerprint is
    announced; another run's checkpoints are refused (the manager is closed then)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(
        out_dir / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))
    try:
        restored = _restore(mngr, params, opt_state, fingerprint, state_key, out_dir)
    except BaseException:
        mngr.close()
        raise
    if restored is None:
        return mngr, params, opt_state, history, 0, None
    params, opt_state, meta = restored
    step = int(meta["step"])
    history = meta["history"]
    history["resumed_from"] = step
    if step >= total:
        info(f"reusing the finished {desc} in {out_dir} ({total} steps)")
    else:
        info(f"resumed {desc} from step {step} of {total} ({out_dir})")
    return mngr, params, opt_state, history, step, step


@dataclasses.dataclass
class _Loop:
    """The mutable state of one `train_loop` call and its three actions: dispatch a step,
    wait for steps in flight (recording their stats), save a checkpoint."""
    mngr: Any
    bar: Any
    params: Any
    opt_state: Any
    history: dict[str, Any]
    step: int
    last_saved: int
    total: int
    spe: int
    fingerprint: dict[str, Any]
    state_key: str
    stats_keys: dict[str, str]
    inflight: list = dataclasses.field(default_factory=list)  # (step, stats) not waited for

    def dispatch(self, step_fn: Callable, batch, cfg: TrainConfig) -> None:
        ids, mask, tgt, idx = _micro(batch, cfg)
        self.history["lr"].append(lr_at(cfg, self.total, self.step))
        self.params, self.opt_state, stats = step_fn(self.params, self.opt_state, ids, mask,
                                                     tgt, idx, self.step)
        self.inflight.append((self.step, stats))
        self.step += 1

    def finish(self, keep: int) -> None:
        """Wait for the oldest steps in flight until `keep` remain; record their stats."""
        while len(self.inflight) > keep:
            k, s = self.inflight.pop(0)
            s = jax.device_get(s)
            if not math.isfinite(float(s["loss"])):
                raise LayerIFError(
                    f"the training loss is not finite at step {k + 1} of {self.total} "
                    f"(diverged); lower --lr or raise --warmup (the last checkpoint, step "
                    f"{self.last_saved}, is kept)")
            for key, name in self.stats_keys.items():
                self.history[key].append(float(s[name]))
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.history['train_loss'][-1]:.4f}")

    def save(self) -> None:
        import orbax.checkpoint as ocp

        self.finish(0)
        flat = {self.state_key: _flat(self.params), "opt": _flat(self.opt_state)}
        host = jax.tree.map(np.asarray, flat)
        bad = checksum.nonfinite(host)
        if bad is not None:
            raise LayerIFError(f"the trained state is not finite after step {self.step} "
                               f"({bad}); nothing saved (the last checkpoint, step "
                               f"{self.last_saved}, is kept)")
        meta = {"step": self.step, "epoch": self.step // self.spe,
                "fingerprint": self.fingerprint, "digests": checksum.tree_digests(host),
                "history": self.history}
        self.mngr.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()
        folder = Path(self.mngr.directory) / str(self.step)
        write_json(folder / FILE_SUMS, checksum.file_digests(folder, skip=FILE_SUMS))
        self.last_saved = self.step

    def save_if_new(self) -> None:
        if self.step > self.last_saved and self.step > 0:
            self.save()

    def end_epoch(self, epoch: int, val_loss: Callable | None) -> None:
        self.finish(0)
        losses = self.history["train_loss"][epoch * self.spe:(epoch + 1) * self.spe]
        rec = {"epoch": epoch + 1, "step": self.step,
               "train_loss": float(np.mean(losses)) if losses else None}
        if val_loss is not None:
            rec["val_loss"] = val_loss(self.params)
        self.history["epochs"].append(rec)
        self.save()


def train_loop(params, opt_state, step_fn: Callable, *, cfg: TrainConfig,
               train: Sequence[Example], out_dir: Path, fingerprint: dict[str, Any],
               state_key: str, stats_keys: dict[str, str], val_loss: Callable | None = None,
               max_steps: int | None = None, progress: bool = True, pad_id: int = 0,
               desc: str = "train") -> LoopResult:
    """The epoch / step loop shared by LoRA fine-tuning and LoRA-MoE training.

    `step_fn(params, opt_state, ids, mask, targets, index, step) -> (params, opt_state,
    stats)` is one jitted optimizer step over the micro-batches of one effective batch.
    Orbax checkpoints (out_dir/checkpoints: {state_key: params, "opt": opt_state} and a
    JSON meta with step, fingerprint, SHA-256 of every array and history) are written
    every cfg.checkpoint_every steps, at every epoch end, on completion and on a stop
    (Ctrl-C, SIGTERM: `layerif_jax.stop`); a later call resumes from the newest intact
    one (another run's is refused, a damaged one skipped with a note). Data order
    depends on (seed, epoch) only, so a resumed run follows the uninterrupted
    trajectory. At most one step runs ahead of the one being waited for, so a stop
    acts after the current step and the progress bar counts finished steps. A
    non-finite loss stops the run with an error (the last checkpoint is kept).
    `stats_keys` maps history lists to step-stat names ({"train_loss": "loss", ...});
    `val_loss(params)` is called at every epoch end; `max_steps` stops early without
    changing the schedule.
    """
    from tqdm.auto import tqdm

    T = pad_length(train, cfg.max_len)
    spe = -(-len(train) // cfg.effective_batch)
    total = spe * cfg.epochs
    history: dict[str, Any] = {**{k: [] for k in stats_keys}, "lr": [], "epochs": [],
                               "steps_per_epoch": spe, "total_steps": total,
                               "resumed_from": None}
    mngr, params, opt_state, history, step, resumed_from = _open(
        out_dir, cfg, params, opt_state, fingerprint, state_key, history, total, desc)
    bar = tqdm(total=total, initial=step, disable=not progress, desc=desc, unit="step",
               dynamic_ncols=True)
    run = _Loop(mngr, bar, params, opt_state, history, step,
                step if resumed_from is not None else -1, total, spe, fingerprint,
                state_key, stats_keys)
    limit = total if max_steps is None else min(total, max_steps)
    t0 = time.perf_counter()
    try:
        while run.step < limit:
            epoch, first = divmod(run.step, spe)
            batches = epoch_batches(train, cfg.effective_batch, seed=cfg.seed,
                                    epoch=epoch, max_len=T, pad_id=pad_id)
            for b in range(first, min(spe, first + limit - run.step)):
                run.dispatch(step_fn, batches[b], cfg)
                run.finish(1)
                check_stop()
                if run.step % cfg.checkpoint_every == 0 and run.step % spe != 0:
                    run.save()
            if run.step % spe == 0:
                run.end_epoch(epoch, val_loss)
        run.save_if_new()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (stop.Interrupted): keep the work done
        try:
            run.save_if_new()
        except LayerIFError:
            pass  # a diverged state is not saved; the stop still stands
        raise
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    run.finish(0)
    history = run.history
    history["step"] = run.step
    history["completed"] = run.step >= total
    history["seconds"] = time.perf_counter() - t0  # of this call
    return LoopResult(run.params, run.opt_state, history, run.step, total, resumed_from)


def finish_run(out: OutputDir, history: dict[str, Any], state: dict[str, Any],
               write_adapter: Callable[[Path], Any]) -> None:
    """Commit history.json, train_state.json and (when complete) the adapter, which
    `write_adapter(path)` writes; the checkpoints stay."""
    done = history["completed"]
    with out.staging(exclusive=False) as tmp:
        if done:
            write_adapter(tmp / ADAPTER_DIR)
        write_json(tmp / HISTORY_FILE, history)
        write_json(tmp / STATE_FILE, {
            "status": "complete" if done else "stopped",
            "step": history["step"], "total_steps": history["total_steps"],
            "steps_per_epoch": history["steps_per_epoch"], **state,
            "adapter": ADAPTER_DIR if done else None,
            "final_train_loss": history["train_loss"][-1] if history["train_loss"] else None,
            "final_val_loss": (history["epochs"][-1].get("val_loss") if history["epochs"]
                               else None)})


@contextlib.contextmanager
def run_dir(out_dir, command: str, overwrite: bool = False) -> Iterator[OutputDir]:
    """The locked output directory of a training run (an `OutputDir`, or a path to open)."""
    out = (out_dir if isinstance(out_dir, OutputDir)
           else OutputDir(Path(out_dir).resolve(), command, overwrite=overwrite))
    with out:
        out.claim([CHECKPOINT_DIR])
        yield out


@dataclasses.dataclass(frozen=True)
class RunData:
    """What `finetune` and `moe.train_moe` both check and derive before their loop."""
    train: list
    val: list | None
    val_length: int  # padded length of the validation batches (0 without validation)
    total_steps: int


def prepare_run(train_examples: Sequence[Example], val_examples: Sequence[Example] | None,
                cfg: TrainConfig, max_steps: int | None) -> RunData:
    """Validate a run's inputs (clear errors) and derive its data and step count."""
    if max_steps is not None and max_steps < 0:
        raise LayerIFError(f"max_steps must be >= 0, got {max_steps}")
    if not train_examples:
        raise LayerIFError("no training examples")
    train = fit_examples(train_examples, cfg.max_len, "training")
    val = fit_examples(val_examples, cfg.max_len, "validation") if val_examples else None
    return RunData(train, val, pad_length(val, cfg.max_len) if val else 0,
                   -(-len(train) // cfg.effective_batch) * cfg.epochs)


def float32_master(tree):
    """(float32 copy of `tree`, its original leaf dtypes) -- undo with `cast_like`."""
    return (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree),
            [x.dtype for x in jax.tree.leaves(tree)])


def cast_like(tree, dtypes):
    """`tree` with its leaves cast back to `dtypes` (the float32 master copy -> model dtype)."""
    return jax.tree.unflatten(jax.tree.structure(tree), [
        x.astype(dt) for x, dt in zip(jax.tree.leaves(tree), dtypes)])
