"""LoRA fine-tuning (METHOD.md sections 1 and 4): AdamW, linear warm-up then linear decay.

One optimizer step is ONE jitted pure function of (LoRA state, optimizer state, frozen
base state, a [grad_accum, batch_size, T] block of micro-batches, RNG key). Gradients
are taken with respect to the LoRA parameters only (`nnx.split(model, nnx.LoRAParam,
...)`); the base parameters are an ordinary (non-differentiated) argument.

Gradient accumulation is explicit, a `lax.scan` over the micro-batches inside the
jitted step, rather than `optax.MultiSteps`:
  * the loss of an optimizer step is the mean over the *real* rows of the whole
    effective batch (filler rows, index -1, never count), so micro-batch gradients
    are summed and divided once by the real-row count: `accum 2 x batch 2` is exactly
    `accum 1 x batch 4` even when the last batch of an epoch is partly filler;
    MultiSteps averages micro-batch means with equal weight, which is wrong there;
  * one dispatch per optimizer step and no accumulator buffer in the optimizer state
    (smaller checkpoints, optimizer state = the plain AdamW state);
  * the optimizer step count equals the schedule step, so the schedule, the data
    position and the checkpoint step are all the same number.

Data order depends only on (seed, epoch): an epoch is `epoch_batches` with the
effective batch size (batch_size * grad_accum), reshaped into micro-batches. Resuming
from a checkpoint at global step s therefore restarts epoch s // steps_per_epoch at
batch s % steps_per_epoch and reproduces the uninterrupted run. Dropout keys are
`fold_in(key(seed), step)` (computed inside the step), so they too survive a restart.
"""

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
import optax
from flax import nnx

from .. import checksum, dtypes
from ..data import Example, bucket_length, epoch_batches
from ..errors import LayerIFError
from ..io import OutputDir, write_json
from ..loss import lm_loss
from ..models.lora import lora_config_of
from ..notes import info, note
from ..formats.peft import save_peft_adapter
from ..stop import check as check_stop

CHECKPOINT_DIR = "checkpoints"
FILE_SUMS = "layerif_files.sha256.json"  # in each checkpoint folder, beside orbax's files
ADAPTER_DIR = "adapter"
STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. `batch_size` is the micro-batch; effective batch = batch_size * grad_accum.

    `checkpoint_every`: a checkpoint every N optimizer steps, and always at each epoch end.
    `max_grad_norm`: global-norm clipping of the LoRA gradient (None or 0 = off).
    `keep`: checkpoints kept on disk.
    """
    epochs: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 128
    seed: int = 0
    compute_dtype: str = "float32"
    checkpoint_every: int = 50
    max_grad_norm: float | None = 1.0
    keep: int = 2

    def __post_init__(self):
        def need_int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise LayerIFError(f"{name} must be an integer, got {v!r}")
            if v < lo:
                raise LayerIFError(f"{name} must be >= {lo}, got {v}")
        need_int("epochs", 1)
        need_int("batch_size", 1)
        need_int("grad_accum", 1)
        need_int("max_len", 2)
        need_int("warmup_steps", 0)
        need_int("checkpoint_every", 1)
        need_int("keep", 1)
        need_int("seed", 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LayerIFError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise LayerIFError(f"weight decay must be >= 0, got {self.weight_decay!r}")
        g = self.max_grad_norm
        if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
            raise LayerIFError(f"max_grad_norm must be >= 0 or None, got {g!r}")
        try:
            dt = dtypes.name(self.compute_dtype)
        except LayerIFError:
            raise LayerIFError(f"compute dtype must be float32 or bfloat16, got "
                               f"{self.compute_dtype!r}") from None
        object.__setattr__(self, "compute_dtype", dt)
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        object.__setattr__(self, "max_grad_norm", float(g) if g else None)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum


# -- schedule and optimizer ---------------------------------------------------------------

def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """lr(step): linear 0 -> lr over the warm-up (clipped to total_steps), then linear lr -> 0
    at total_steps. Step k is the learning rate of the (k+1)-th update (so the first update
    of a warm-up run has lr 0, as in transformers' linear schedule)."""
    total = max(int(total_steps), 1)
    warm = min(cfg.warmup_steps, total)
    if warm == 0:
        return optax.linear_schedule(cfg.lr, 0.0, total)
    if warm == total:
        return optax.linear_schedule(0.0, cfg.lr, warm)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warm), optax.linear_schedule(cfg.lr, 0.0, total - warm)],
        [warm])


def lr_at(cfg: TrainConfig, total_steps: int, step: int) -> float:
    """make_schedule's value in plain Python (for logging: no device op, no sync)."""
    total = max(int(total_steps), 1)
    warm = min(cfg.warmup_steps, total)
    if step < warm:
        return cfg.lr * step / warm
    if warm == total:
        return cfg.lr
    return cfg.lr * (1.0 - min(step - warm, total - warm) / (total - warm))


def optimizer_of(lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 max_grad_norm: float | None) -> optax.GradientTransformation:
    """The optimizer of an `opt_spec` tuple (what a jitted step rebuilds from its static
    argument): AdamW on the warm-up/decay schedule, after clipping."""
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      max_grad_norm=max_grad_norm)
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=weight_decay)
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


def opt_spec(cfg: TrainConfig, total_steps: int) -> tuple:
    """Hashable description of the optimizer: a static jit argument, so runs with the same
    settings share one compiled step."""
    return (cfg.lr, cfg.weight_decay, cfg.warmup_steps, int(total_steps), cfg.max_grad_norm)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay) on the warm-up/decay
    schedule, after global-norm clipping when cfg.max_grad_norm is set."""
    return optimizer_of(*opt_spec(cfg, total_steps))


# -- the pure step functions ----------------------------------------------------------------

def split_model(model):
    """(graphdef, lora_state, rest_state) of a model with LoRA."""
    if lora_config_of(model) is None or not nnx.state(model, nnx.LoRAParam):
        raise LayerIFError("the model has no LoRA adapters to train (apply LoRA first)")
    return nnx.split(model, nnx.LoRAParam, ...)


def real_loss_sum(graphdef, lora, rest, ids, mask, targets, index, key=None, *,
                  dtype: str = "float32", dropout: bool = False):
    """(sum of per-example losses over real rows, number of real rows) of one [B, T] batch.

    Per-example loss = mean token loss over the example's target tokens
    (`layerif_jax.loss.lm_loss`); rows with index -1 are fillers and contribute nothing,
    whatever their ids, mask or target flags. Pure; traced inside jit.
    """
    model = nnx.merge(graphdef, lora, rest)
    per = lm_loss(model, ids, mask, targets, dropout_key=key if dropout else None,
                  dtype=dtypes.jnp_dtype(dtype))
    real = index >= 0
    return jnp.sum(jnp.where(real, per, 0.0)), jnp.sum(real)


def accumulate(fn: Callable, params, micro):
    """Sums over micro-batches (a scan: one micro-batch of activations alive at a time)
    of fn(params, *m) -> (objective, stats) and of the objective's gradient. `micro`:
    arrays with a leading micro-batch axis. Returns (gradient sums in float32, shaped like
    `params`; stats sums). The one gradient accumulation of LoRA and LoRA-MoE training."""
    g_fn = jax.grad(fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro)
    stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                          jax.eval_shape(lambda: fn(params, *first)[1]))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)

    def body(carry, xs):
        gsum, ssum = carry
        g, st = g_fn(params, *xs)
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), gsum, g),
                jax.tree.map(jnp.add, ssum, st)), None

    (gsum, ssum), _ = jax.lax.scan(body, (zeros, stats0), micro)
    return gsum, ssum


def accumulated_grads(graphdef, lora, rest, ids, mask, targets, index, key=None, *,
                      dtype: str = "float32", dropout: bool = False):
    """Mean loss over the real rows of a block of micro-batches and its LoRA gradient.

    ids/mask/targets: [A, B, T]; index: [A, B] (-1 = filler row). The micro-batch loss
    *sums* are accumulated (`accumulate`) and divided once by the real-row count of the
    whole block. Returns (loss, n_real_rows, grads) with grads shaped like `lora`
    (float32). Pure; traced inside jit.
    """
    keys = jax.random.split(key if key is not None else jax.random.key(0), ids.shape[0])

    def summed(lora_, ids_, mask_, tgt_, idx_, key_):
        lsum = real_loss_sum(graphdef, lora_, rest, ids_, mask_, tgt_, idx_, key_,
                             dtype=dtype, dropout=dropout)[0]
        return lsum, lsum

    gsum, lsum = accumulate(summed, lora, (ids, mask, targets, index, keys))
    n = jnp.sum(index >= 0)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    return lsum / denom, n, jax.tree.map(lambda g: g / denom, gsum)


tree_norm = (optax.tree.norm if hasattr(getattr(optax, "tree", None), "norm")
              else optax.global_norm)


def _train_step_impl(lora, opt_state, rest, ids, mask, targets, index, base_key, step, *,
                     graphdef, opt_spec, dtype, dropout):
    """One optimizer step; the dropout key is fold_in(base_key, step) (reproducible on resume)."""
    tx = optimizer_of(*opt_spec)
    key = jax.random.fold_in(base_key, step)
    loss, n, grads = accumulated_grads(graphdef, lora, rest, ids, mask, targets, index, key,
                                       dtype=dtype, dropout=dropout)
    gnorm = tree_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, {"loss": loss, "grad_norm": gnorm, "rows": n}


# graphdef / optimizer spec / dtype / dropout are static: one compile per distinct setting,
# shared across finetune() calls (an interrupted run and its resumption compile once).
train_step = jax.jit(_train_step_impl, static_argnames=("graphdef", "opt_spec", "dtype", "dropout"))


def _eval_impl(lora, rest, ids, mask, targets, index, *, graphdef, dtype):
    return real_loss_sum(graphdef, lora, rest, ids, mask, targets, index, dtype=dtype)


eval_loss_sum = jax.jit(_eval_impl, static_argnames=("graphdef", "dtype"))


# -- helpers -------------------------------------------------------------------------------

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


def _describe_diff(a: dict, b: dict, prefix="") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _describe_diff(va, vb, prefix + k + ".")
            if d:
                return d
        elif va != vb:
            if k in _WHAT and not prefix:
                return _WHAT[k]
            return f"{prefix}{k}: checkpoint {va!r}, now {vb!r}"
    return ""


def _oneline(e: BaseException, limit: int = 160) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return msg if len(msg) <= limit else msg[:limit] + "..."


# -- the training loop ----------------------------------------------------------------------

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
        diff = _describe_diff(meta.get("fingerprint", {}), fingerprint)
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
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    T = pad_length(train, cfg.max_len)
    spe = -(-len(train) // cfg.effective_batch)
    total = spe * cfg.epochs
    mngr = ocp.CheckpointManager(
        out_dir / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))
    history: dict[str, Any] = {**{k: [] for k in stats_keys}, "lr": [], "epochs": [],
                               "steps_per_epoch": spe, "total_steps": total,
                               "resumed_from": None}
    step = 0
    try:
        restored = _restore(mngr, params, opt_state, fingerprint, state_key, out_dir)
    except BaseException:
        mngr.close()
        raise
    if restored is not None:
        params, opt_state, meta = restored
        step = int(meta["step"])
        history = meta["history"]
        history["resumed_from"] = step
        if step >= total:
            info(f"reusing the finished {desc} in {out_dir} ({total} steps)")
        else:
            info(f"resumed {desc} from step {step} of {total} ({out_dir})")

    last_saved = step if restored is not None else -1
    inflight: list[tuple[int, dict]] = []  # (step, stats) dispatched, not yet waited for

    def finish(keep: int):
        """Wait for the oldest steps in flight until `keep` remain; record their stats."""
        while len(inflight) > keep:
            k, s = inflight.pop(0)
            s = jax.device_get(s)
            if not math.isfinite(float(s["loss"])):
                raise LayerIFError(
                    f"the training loss is not finite at step {k + 1} of {total} (diverged); "
                    f"lower --lr or raise --warmup (the last checkpoint, step {last_saved}, "
                    "is kept)")
            for key, name in stats_keys.items():
                history[key].append(float(s[name]))
            bar.update(1)
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}")

    def save():
        nonlocal last_saved
        finish(0)
        flat = {state_key: _flat(params), "opt": _flat(opt_state)}
        host = jax.tree.map(np.asarray, flat)
        bad = checksum.nonfinite(host)
        if bad is not None:
            raise LayerIFError(f"the trained state is not finite after step {step} ({bad}); "
                               f"nothing saved (the last checkpoint, step {last_saved}, is kept)")
        meta = {"step": step, "epoch": step // spe, "fingerprint": fingerprint,
                "digests": checksum.tree_digests(host), "history": history}
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
        folder = Path(mngr.directory) / str(step)
        write_json(folder / FILE_SUMS, checksum.file_digests(folder, skip=FILE_SUMS))
        last_saved = step

    stop = step >= total or (max_steps is not None and step >= max_steps)
    bar = tqdm(total=total, initial=step, disable=not progress, desc=desc, unit="step",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        while not stop and step < total:
            epoch, first = divmod(step, spe)
            batches = epoch_batches(train, cfg.effective_batch, seed=cfg.seed,
                                    epoch=epoch, max_len=T, pad_id=pad_id)
            for b in range(first, spe):
                if max_steps is not None and step >= max_steps:
                    stop = True
                    break
                ids, mask, tgt, idx = _micro(batches[b], cfg)
                history["lr"].append(lr_at(cfg, total, step))
                params, opt_state, stats = step_fn(params, opt_state, ids, mask, tgt, idx,
                                                   step)
                inflight.append((step, stats))
                step += 1
                finish(1)
                check_stop()
                if step % cfg.checkpoint_every == 0 and step % spe != 0:
                    save()
            if stop:
                break
            finish(0)  # epoch end
            losses = history["train_loss"][epoch * spe:(epoch + 1) * spe]
            rec = {"epoch": epoch + 1, "step": step,
                   "train_loss": float(np.mean(losses)) if losses else None}
            if val_loss is not None:
                rec["val_loss"] = val_loss(params)
            history["epochs"].append(rec)
            save()
        if step > last_saved and step > 0:
            save()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (stop.Interrupted): keep the work done
        if step > last_saved and step > 0:
            try:
                save()
            except LayerIFError:
                pass  # a diverged state is not saved; the stop still stands
        raise
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    finish(0)
    history["step"] = step
    history["completed"] = step >= total
    history["seconds"] = time.perf_counter() - t0  # of this call
    return LoopResult(params, opt_state, history, step, total,
                      None if restored is None else int(restored[2]["step"]))


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


def finetune(model, train_examples: Sequence[Example], out_dir, cfg: TrainConfig | None = None,
             *, val_examples: Sequence[Example] | None = None, progress: bool = True,
             max_steps: int | None = None, pad_id: int = 0, base_model_name: str = "",
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the LoRA parameters of `model` (in place) on `train_examples`.

    `out_dir`: a path or an open `io.OutputDir` (locked; files of others in it are
    refused unless `overwrite`). Writes orbax checkpoints under out_dir/checkpoints and
    resumes from the newest intact one when its fingerprint (settings, data, base
    weights, initial adapter: `run_fingerprint`) matches; another run's is refused. On
    completion commits out_dir/adapter (PEFT format), out_dir/train_state.json and
    out_dir/history.json. `max_steps`: stop (with a checkpoint) once the global
    optimizer step reaches it, without changing the schedule; a later call resumes.
    Returns the history: per-step train_loss / lr / grad_norm, per-epoch records, step
    counts.
    """
    cfg = cfg or TrainConfig()
    run = prepare_run(train_examples, val_examples, cfg, max_steps)
    train, val, T_val, total = run.train, run.val, run.val_length, run.total_steps
    lcfg = lora_config_of(model)
    graphdef, lora, rest = split_model(model)
    lora, orig_dtypes = float32_master(lora)
    spec = opt_spec(cfg, total)
    dropout = lcfg.dropout > 0
    base_key = jax.random.key(cfg.seed)  # dropout key of step s: fold_in(base_key, s)
    lora_fp = {"rank": lcfg.rank, "alpha": lcfg.alpha, "dropout": lcfg.dropout,
               "targets": list(lcfg.targets)}
    fp = run_fingerprint(cfg, train, total, model_config=model.cfg, base=rest, init=lora,
                         lora=lora_fp)

    def step_fn(lora, opt_state, ids, mask, tgt, idx, step):
        return train_step(lora, opt_state, rest, ids, mask, tgt, idx, base_key, np.int32(step),
                          graphdef=graphdef, opt_spec=spec, dtype=cfg.compute_dtype,
                          dropout=dropout)

    with run_dir(out_dir, "finetune", overwrite) as out:
        res = train_loop(
            lora, optimizer_of(*spec).init(lora), step_fn, cfg=cfg, train=train,
            out_dir=out.path, fingerprint=fp, state_key="lora",
            stats_keys={"train_loss": "loss", "grad_norm": "grad_norm"},
            val_loss=((lambda p: evaluate(graphdef, p, rest, val, cfg, T_val, pad_id))
                      if val else None),
            max_steps=max_steps, progress=progress, pad_id=pad_id, desc="finetune")
        nnx.update(model, cast_like(res.params, orig_dtypes))
        finish_run(out, res.history, {
            "epochs_done": res.step // res.history["steps_per_epoch"],
            "config": dataclasses.asdict(cfg), "lora": lora_fp, "n_train": len(train),
            "n_val": len(val) if val else 0, "padded_length": pad_length(train, cfg.max_len),
            "base_model": base_model_name or None},
            lambda p: save_peft_adapter(model, p, base_model_name=base_model_name))
    return res.history


def evaluate(graphdef, lora, rest, examples: Sequence[Example], cfg: TrainConfig,
             length: int, pad_id: int = 0) -> float:
    """Mean (over examples) of the per-example mean token loss; dropout off."""
    total, n = 0.0, 0
    for batch in epoch_batches(examples, cfg.batch_size, seed=0, epoch=0, max_len=length,
                               pad_id=pad_id, shuffle=False):
        s, k = eval_loss_sum(lora, rest, batch.ids, batch.mask, batch.targets, batch.index,
                             graphdef=graphdef, dtype=cfg.compute_dtype)
        total += float(s)
        n += int(k)
    return total / max(n, 1)


def batch_loss(model, batch, dtype: str = "float32") -> float:
    """Training loss of one padded `data.Batch`: mean over its real rows (dropout off)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    s, k = eval_loss_sum(lora, rest, batch.ids, batch.mask, batch.targets, batch.index,
                         graphdef=graphdef, dtype=dtypes.name(dtype))
    return float(s) / max(int(k), 1)


def validation_loss(model, examples: Sequence[Example], cfg: TrainConfig | None = None,
                    pad_id: int = 0) -> float:
    """Mean per-example loss of `model` (LoRA or not) on `examples`, dropout off."""
    cfg = cfg or TrainConfig()
    ex = fit_examples(examples, cfg.max_len, "validation")
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    return evaluate(graphdef, lora, rest, ex, cfg, pad_length(ex, cfg.max_len), pad_id)
