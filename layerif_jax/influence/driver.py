"""The passes of a layer-wise influence run, shared by every engine.

1. validation: per-example gradients, averaged into v (or kept, one v per
   validation example, with `per_val`);
2. training: per-example gradients -> ||g_i,b||^2 and v . g_i,b per unit; the
   gradients themselves are kept when n x d fits the memory budget, and when it does
   not, as many calls' gradients as fit are kept (`keep_plan`);
3. the estimator's preconditioning (DataInf: one weighted gradient sum per unit);
4. scores h . g_i per unit, summed into layers.

Passes 3 and 4 stream the kept gradients and recompute the others call by call;
results do not depend on which (beyond float rounding), nor on the chunking. An
engine turns examples into fixed-shape calls (`chunks`) and a call into per-example
gradients in piece form with a finite flag per row (`grads`); `call.index` maps rows
to input positions (-1 = filler).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import EstimatorsFailed, LayerIFError
from ..memory import Peak
from ..notes import info, note
from ..stop import check as check_stop
from . import core
from .aggregate import AGGREGATES, aggregate
from .distributed import accumulate, pace, to_host
from .estimators import Context, Estimator, no_factors
from .partition import Partition


@dataclasses.dataclass
class LayerScores:
    """The result of a run. Positive per-example scores are beneficial (METHOD.md 2)."""
    layer_scores: np.ndarray            # [L], the chosen aggregate
    per_example: np.ndarray             # [n, L]
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
    layer_ids: tuple = ()               # the model's layer numbers of the L columns

    @property
    def per_val(self) -> np.ndarray | None:
        """[n, m], summed over layers."""
        return None if self.per_val_layers is None else self.per_val_layers.sum(-1)

    def aggregated(self, how: str) -> np.ndarray:
        return np.asarray(aggregate(self.per_example, how))


# lambda_b per unit: None / "adaptive" = damping_scale x mean_i ||g_i,b||^2 / d_b (DataInf's;
# for the empirical Fisher that IS damping_scale x its mean eigenvalue tr(G_b) / d_b);
# "mean_eigenvalue" = damping_scale x tr(C_b) / d_b of the run's curvature (Hutchinson
# with HUTCHINSON_PROBES Rademacher probes for the Gauss-Newton and the Hessian); a number
# = that lambda for every unit.
DAMPINGS = ("adaptive", "mean_eigenvalue")
HUTCHINSON_PROBES = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run shares, whichever engine."""
    estimator: Estimator
    aggregate: str = "+ve"
    damping: float | str | None = None   # see DAMPINGS
    damping_scale: float = 0.1
    per_val: bool = False
    budget: int | None = None
    skip_zero_units: bool = False
    progress: bool = False
    curvature: str = "empirical_fisher"
    estimators: tuple = ()   # several estimators on the same gradients (estimator: the first)

    def __post_init__(self):
        from .engines.general import CURVATURES
        if self.curvature not in CURVATURES:
            raise LayerIFError(f"unknown curvature {self.curvature!r} (choose from "
                               f"{', '.join(CURVATURES)})")
        for est in self.estimators or (self.estimator,):
            takes = getattr(est, "curvatures", ("empirical_fisher",))
            if self.curvature not in takes:
                raise LayerIFError(f"estimator {est.name!r} works with the "
                                   f"{' / '.join(takes)} curvature only, not "
                                   f"{self.curvature!r} (cg, lissa, arnoldi and exact take any; kfac "
                                   "and ekfac the true Fisher too)")
        if self.aggregate not in AGGREGATES:
            raise LayerIFError(f"unknown aggregate {self.aggregate!r} (choose from "
                               f"{', '.join(AGGREGATES)})")
        if isinstance(self.damping, str):
            if self.damping not in DAMPINGS:
                raise LayerIFError(f"damping must be a number > 0 or one of "
                                   f"{', '.join(DAMPINGS)}, got {self.damping!r}")
        elif self.damping is not None and not self.damping > 0:
            raise LayerIFError(f"damping must be > 0, got {self.damping}")
        if not self.damping_scale > 0:
            raise LayerIFError(f"damping scale must be > 0, got {self.damping_scale}")


# -- helpers ------------------------------------------------------------------------------

def progress(it, total, desc, enabled):
    """The items of `it`, with a progress bar (process 0) and a stop check before each:
    a Ctrl-C or SIGTERM (`layerif_jax.stop`) ends the run between two calls."""
    bar = None
    if enabled and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="call", leave=False)
    try:
        for x in it:
            check_stop()
            yield x
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def raise_nonfinite(finite_calls, calls, what):
    bad = sorted(int(i) for f, b in zip(finite_calls, calls)
                 for i, ok in zip(b.index, to_host(f)) if i >= 0 and not ok)
    if bad:
        raise LayerIFError(f"NaN or inf in the gradient of {what} example(s) {bad[:10]}"
                           f"{' ...' if len(bad) > 10 else ''} (index in the input order)")


def keep_plan(calls, bytes_per_row: int, budget: int | None) -> np.ndarray:
    """Which training calls keep their gradients under `budget` (bytes).

    All of them when n x d fits. Otherwise a greedy knapsack: calls with the most
    tokens of work per kept byte first (a recomputation costs the call's tokens,
    keeping costs its rows), each taken while it still fits. So a budget a little
    below n x d costs a few recomputed calls, not two more passes over the training set.
    """
    rows = np.array([len(b.index) for b in calls])
    if budget is None or bytes_per_row * rows.sum() <= budget:
        return np.ones(len(calls), bool)
    tokens = np.array([b.tokens for b in calls], float)
    keep, used = np.zeros(len(calls), bool), 0
    for k in np.argsort(-tokens / rows, kind="stable"):
        if used + bytes_per_row * rows[k] <= budget:
            keep[k], used = True, used + bytes_per_row * rows[k]
    return keep


def _gb(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size / 10:
            return f"{b / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(b)} bytes"


def say_memory_plan(calls, keep_call, need: int, budget: int | None, n: int) -> None:
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


def input_order(calls, count: int) -> np.ndarray:
    """Rows of the concatenated calls in input order (fillers dropped)."""
    idx = np.concatenate([b.index for b in calls])
    return np.argsort(np.where(idx < 0, np.iinfo(np.int32).max, idx))[:count]


_sq_norms = jax.jit(core.sq_norms)
_dots = jax.jit(core.dots)
_mean = jax.jit(core.mean_leaves, static_argnums=1)
_as_f32 = jax.jit(lambda g: [x.astype(jnp.float32) for x in g])


# -- the passes -----------------------------------------------------------------------------

def validation_pass(engine, calls, m: int, per_val: bool, show: bool) -> list[jax.Array]:
    """v: the mean validation gradient (leaves [1, P_k, ...]) or, with per_val, every
    validation example's gradient (leaves [m_pad, P_k, ...])."""
    parts, fins, total = [], [], None
    for b in progress(calls, len(calls), "validation grads", show):
        g, fin = engine.grads(b)
        if per_val:
            parts.append(pace(_as_f32(g)))
        else:
            total = accumulate(total, _mean(g, m))
        fins.append(fin)
    raise_nonfinite(fins, calls, "validation")
    if per_val:
        return [jnp.concatenate(xs) for xs in zip(*parts)]
    return total


def training_pass(engine, calls, v, keep_call, show: bool, factors: bool = False,
                  checkpoint=None):
    """(kept gradients per call or None, ||g||^2 [n_pad, P], v . g [n_pad, M, P], the
    K-FAC token sums of every call or None). With a `resume.Checkpoint` the calls it
    holds are restored, not recomputed, and the rest are saved as they finish."""
    kept, sq, vg, fins, sums = [], [], [], [], None
    start = 0
    if checkpoint is not None:
        layout = getattr(engine, "grad_layout", None)   # restored: as the engine lays them
        for sq_c, vg_c, fin_c, kept_c, sums_c in checkpoint.train_segments():
            if layout is not None:
                kept_c = [None if g is None else layout(g) for g in kept_c]
            sq, vg, fins, kept = sq + sq_c, vg + vg_c, fins + fin_c, kept + kept_c
            sums = sums_c if sums_c is not None else sums
        start = checkpoint.train_done()
    try:
        for k, b in enumerate(progress(calls[start:], len(calls) - start, "train grads", show),
                              start):
            if factors:
                g, fin, f = engine.grads_and_factors(b)
                sums = accumulate(sums, f, donate=False)   # a save may still hold sums
            else:
                g, fin = engine.grads(b)
            sq.append(_sq_norms(g))
            vg.append(_dots(g, v))
            fins.append(fin)
            pace((sq[-1], vg[-1], fin))
            kept.append(g if keep_call[k] else None)
            if checkpoint is not None:
                checkpoint.train_step(k, sq[-1], vg[-1], fin, kept[-1], sums)
        if checkpoint is not None:
            checkpoint.finish_train(len(calls), sums)
    except BaseException:
        if checkpoint is not None:   # a clean stop (or an error) keeps the save in flight
            checkpoint.settle()
        raise
    raise_nonfinite(fins, calls, "training")
    return kept, jnp.concatenate(sq), jnp.concatenate(vg), sums


def fingerprint(engine, tb, vb, keep_call, s: Settings, factors: bool, identity: dict) -> dict:
    """What a run's saved gradient passes depend on (`resume`): the model, adapter and
    data (`identity`, from the entry point), the engine and its call layout, the memory
    plan, per_val and whether the K-FAC sums are taken. JSON-shaped."""
    import hashlib
    import json

    from ..io import dumps
    h = hashlib.sha256()
    for b in tb + vb:
        h.update(np.ascontiguousarray(b.index, np.int32).tobytes())
        h.update(str(b.tokens).encode())
    return json.loads(dumps({
        "identity": identity, "engine": engine.name, **engine.describe(tb + vb),
        "devices": 1 if engine.mesh is None else int(engine.mesh.devices.size),
        "processes": jax.process_count(), "calls": [len(tb), len(vb)],
        "call_layout": h.hexdigest(), "kept_calls": "".join("1" if k else "0" for k in keep_call),
        "per_val": s.per_val, "kfac_sums": factors}))


def damping(part: Partition, s: Settings, sq_u, n: int, uses_damping: bool):
    """lambda [L, U]: fixed, or adaptive (damping_scale x mean ||g||^2 / d per unit);
    units whose gradient is zero on every example are refused or (skip_zero_units)
    given lambda 1 so they contribute exactly 0."""
    present = part.sizes() > 0
    sizes = jnp.asarray(np.maximum(part.sizes(), 1), jnp.float32)
    sq_sum = jnp.sum(sq_u, 0)                                   # [L, U]
    lam = (jnp.full(sizes.shape, s.damping, jnp.float32)
           if s.damping is not None and not isinstance(s.damping, str)
           else s.damping_scale * sq_sum / n / sizes)
    zero = np.argwhere((to_host(sq_sum) == 0) & present)
    if len(zero) and uses_damping:
        if not s.skip_zero_units:
            l, u = zero[0]
            raise LayerIFError(
                f"{part.describe(int(l), int(u))} has an all-zero gradient over the training set "
                f"({len(zero)} such units; skip them with skip_zero_units / --skip-zero-units)")
    return jnp.where((sq_sum == 0) | ~jnp.asarray(present), 1.0, lam)


def curvature_product(engine, part: Partition, s: Settings, tb):
    """x -> sum_i C_i,b x_b per unit from the engine, or None for the empirical Fisher
    (and on an engine without curvature products, where only K-FAC's factors may use
    another curvature: `run` refuses the rest)."""
    if s.curvature == "empirical_fisher" or not hasattr(engine, "curvature_product"):
        return None
    _, layer, unit = part.pieces()
    piece_unit = np.unique(layer * part.num_units + unit, return_inverse=True)[1]
    return functools.partial(engine.curvature_product, s.curvature, piece_unit=piece_unit,
                             chunks=tb)


def curvature_trace(product, v, onehot, n: int, probes: int = HUTCHINSON_PROBES):
    """tr(C_b) per unit [L, U], Hutchinson: the mean of z . C z over Rademacher probes."""
    keys = jax.random.split(jax.random.key(0), len(v))
    z = [jnp.where(jax.random.bernoulli(k, 0.5, (probes,) + x.shape[1:]), 1.0, -1.0)
         for k, x in zip(keys, v)]
    cz = product(z)
    return jnp.mean(core.to_units(core.pair_dots(z, cz), onehot), 0) / n


@dataclasses.dataclass
class _Passes:
    """What the validation and training passes produced, shared by every estimator."""
    tb: list
    vb: list
    v: list
    kept: list
    sq_u: Any
    vg_u: Any
    lam: Any
    keep_call: np.ndarray
    offsets: np.ndarray
    need: int
    d_total: int
    onehot: Any
    phases: dict
    seconds: float
    factors: Any = None      # () -> K-FAC factors, computed once for every estimator


def _passes(engine, part: Partition, train, val, n: int, m: int, s: Settings,
            checkpoint=None, identity: dict | None = None) -> _Passes:
    t0 = time.perf_counter()
    engine.plan([train, val])
    tb, vb = engine.chunks(train), engine.chunks(val)
    onehot = jnp.asarray(part.onehot())
    d_total = int(part.sizes().sum())
    offsets = np.cumsum([0] + [len(b.index) for b in tb])
    need = 4 * d_total * int(offsets[-1])
    keep_call = keep_plan(tb, 4 * d_total, s.budget)
    say_memory_plan(tb, keep_call, need, s.budget, n)
    want_factors = bool(_factor_users(s))
    drawn = labels_drawn(s)
    if checkpoint is not None:
        checkpoint.open(fingerprint(engine, tb, vb, keep_call, s, want_factors and not drawn,
                                    identity or {}), engine.mesh)
    v = None if checkpoint is None else checkpoint.validation()
    if v is None:
        v = validation_pass(engine, vb, m, s.per_val, s.progress)
        if checkpoint is not None:
            checkpoint.save_validation(v)
    jax.block_until_ready(v)
    t_val = time.perf_counter()
    kept, sq, vg, sums = training_pass(engine, tb, v, keep_call, s.progress,
                                       want_factors and not drawn, checkpoint)
    sq_u, vg_u = core.to_units(sq, onehot), core.to_units(vg, onehot)  # [n_pad, (M,) L, U]
    jax.block_until_ready((sq_u, vg_u))
    t_drawn = time.perf_counter()
    if drawn:
        sums, sq_drawn = true_fisher_pass(engine, tb, s.progress)
        jax.block_until_ready((sums, sq_drawn))
    uses = any(getattr(e, "uses_damping", True) for e in s.estimators or (s.estimator,))
    lam = damping(part, s, sq_u, n, uses)
    if s.damping == "mean_eigenvalue" and s.curvature != "empirical_fisher":
        tr = (jnp.sum(core.to_units(sq_drawn, onehot), 0) / n if drawn else
              curvature_trace(curvature_product(engine, part, s, tb), v, onehot, n))
        sizes = jnp.asarray(np.maximum(part.sizes(), 1), jnp.float32)
        lam = jnp.where(jnp.asarray(part.sizes() > 0) & (tr > 0),
                        s.damping_scale * tr / sizes, lam)
    jax.block_until_ready((sq_u, vg_u))
    t_train = time.perf_counter()
    factors = (functools.cache(functools.partial(engine.kfac_factors, sums, tb, n))
               if want_factors else None)
    phases = {"validation": round(t_val - t0, 3),
              "train": round((t_drawn if drawn else t_train) - t_val, 3)}
    if drawn:   # the pass at drawn labels, apart from the training pass
        phases["true_fisher"] = round(t_train - t_drawn, 3)
    return _Passes(tb, vb, v, kept, sq_u, vg_u, lam, keep_call, offsets, need, d_total, onehot,
                   phases, t_train - t0, factors)


def true_fisher_pass(engine, calls, show: bool):
    """(the K-FAC token sums, ||g~_i||^2 [n_pad, P]) of the training calls at labels
    drawn from the model (`engine.true_fisher`): one more forward and backward per call."""
    sums, sq, fins = None, [], []
    for b in progress(calls, len(calls), "true Fisher", show):
        g, fin, f = engine.true_fisher(b, factors=True)
        sums = accumulate(sums, f)
        sq.append(_sq_norms(g))
        fins.append(fin)
        pace((sq[-1], fin))
    raise_nonfinite(fins, calls, "training (drawn labels)")
    return sums, jnp.concatenate(sq)


def labels_drawn(s: Settings) -> bool:
    """Whether the run's curvature is K-FAC's factors at labels drawn from the model: the
    true Fisher with only factor estimators (kfac, ekfac), what the packed engine takes."""
    ests = s.estimators or (s.estimator,)
    return s.curvature == "true_fisher" and all(getattr(e, "needs_factors", False)
                                                for e in ests)


def _factor_users(s: Settings) -> list[str]:
    """The estimators of the run that need the K-FAC token sums of the training pass."""
    return [e.name for e in s.estimators or (s.estimator,) if getattr(e, "needs_factors", False)]


def run(engine, part: Partition, train, val, n: int, m: int, s: Settings,
        meta: dict[str, Any], checkpoint=None, identity: dict | None = None):
    """All four passes (see the module docstring). `train`/`val`: what `engine.chunks`
    takes; n and m count the real examples. With `s.estimators` every one of them runs
    on the same gradients and a {name: LayerScores} comes back. `checkpoint`: a
    `resume.Checkpoint` the gradient passes are saved to and resumed from; `identity`
    (JSON: model, adapter, data digests) joins its fingerprint."""
    users = _factor_users(s)
    if users and getattr(engine, "grads_and_factors", None) is None:   # before any work
        raise LayerIFError(no_factors(users[0]))
    if s.curvature != "empirical_fisher" and not hasattr(engine, "curvature_product"):
        others = [e.name for e in s.estimators or (s.estimator,) if e.name not in users]
        if others or not hasattr(engine, "true_fisher") or s.curvature != "true_fisher":
            raise LayerIFError(
                f"the {engine.name} engine has no curvature products: curvature="
                f"{s.curvature!r} there is for kfac and ekfac with the true Fisher only "
                "(their factors from labels drawn from the model); use engine='vmap' for "
                f"{', '.join(others) or s.curvature}")
    try:
        p = _passes(engine, part, train, val, n, m, s, checkpoint, identity)
        if checkpoint is not None:
            meta = {**meta, "checkpoint_dir": str(checkpoint.path),
                    "resumed_calls": checkpoint.resumed_calls}
        ests = list(s.estimators or (s.estimator,))
        # exact first: its h is the reference every other estimator's IHVP is held to
        order = sorted(ests, key=lambda e: e.name != "exact")
        out, ref, failed = {}, None, {}
        for e in order:
            try:
                out[e.name], h = _score(e, engine, part, p, n, m, s, meta, ref)
            except LayerIFError as err:   # one of several: the others still run
                if len(ests) == 1:
                    raise
                failed[e.name] = err
                continue
            if e.name == "exact" and len(ests) > 1:
                ref = p.v if h is None else h
        out = {e.name: out[e.name] for e in ests if e.name in out}
        if failed:
            raise EstimatorsFailed(out, {e.name: failed[e.name] for e in ests
                                         if e.name in failed})
    finally:
        if checkpoint is not None:   # the last save, written while the estimators ran
            checkpoint.close()
    return out if s.estimators else out[s.estimator.name]


def ihvp_error(ctx: Context, h: list[jax.Array], ref: list[jax.Array]) -> dict[str, Any]:
    """How far an estimator's h_b is from exact's, per unit: ||h_b - h*_b|| / ||h*_b||
    (the largest over the validation vectors), as {"per_unit": [L][U] (None where a layer
    has no such unit), "max", "median" (over the units that exist)}, and the cosine of
    h_b with h*_b (its direction; the smallest over validation vectors): "cosine_min",
    "cosine_median"."""
    d = [a - b for a, b in zip(h, ref)]
    rr = ctx.unit_dot(ref, ref)
    rel = to_host(core.safe_div(jnp.sqrt(ctx.unit_dot(d, d)), jnp.sqrt(rr)),
                  np.float64).max(0)                                        # [L, U]
    # the direction alone (scores rank the same under any positive scale of h_b)
    cos = to_host(core.safe_div(ctx.unit_dot(h, ref), jnp.sqrt(ctx.unit_dot(h, h) * rr)),
                  np.float64).min(0)
    _, layer, unit = ctx.part.pieces()
    present = np.zeros(rel.shape, bool)
    present[np.asarray(layer), np.asarray(unit)] = True     # units a layer really has
    return {"per_unit": [[float(x) if ok else None for x, ok in zip(r, o)]
                         for r, o in zip(rel, present)],
            "max": float(rel[present].max()), "median": float(np.median(rel[present])),
            "cosine_min": float(cos[present].min()),
            "cosine_median": float(np.median(cos[present]))}


def _direct(engine, h) -> bool:
    """Whether the recomputed calls' scores come straight from the engine (h . g_e with no
    gradient formed) rather than from recomputed gradients."""
    return (getattr(engine, "scores", None) is not None
            and engine.direct_scores(int(h[0].shape[0])))


def score_calls(engine, p: _Passes, h, direct: bool):
    """h . g_i per piece [rows, M, P] of every training call: from its kept gradients, or
    recomputed -- directly by the engine where `direct`, else from its gradients."""
    for k, b in enumerate(p.tb):
        if p.kept[k] is not None:
            yield pace(_dots(p.kept[k], h))
        elif direct:
            yield pace(engine.scores(b, h)[0])
        else:
            yield pace(_dots(engine.grads(b)[0], h))


def _score(est, engine, part: Partition, p: _Passes, n: int, m: int, s: Settings,
           meta: dict[str, Any], ref: list[jax.Array] | None = None):
    """One estimator's preconditioning and scores on the shared passes -> (LayerScores,
    its h). ref: exact's h, against which an estimator's IHVP error is reported (not for
    a scale-free estimator, whose scores are rescaled after: cosine)."""
    tick = t0 = time.perf_counter()
    phases = dict(p.phases)

    def phase(name, *arrays):  # one sync per phase (not per call) for the timing breakdown
        nonlocal tick
        jax.block_until_ready(arrays)
        now = time.perf_counter()
        phases[name] = round(now - tick, 3)
        tick = now

    def chunks():
        for k, b in enumerate(progress(p.tb, len(p.tb), "influence pass", False)):
            yield (slice(int(p.offsets[k]), int(p.offsets[k + 1])),
                   p.kept[k] if p.kept[k] is not None else engine.grads(b)[0])

    def drawn_chunks():   # recomputed: the same draws as the true Fisher pass
        for k, b in enumerate(progress(p.tb, len(p.tb), "true Fisher", False)):
            yield slice(int(p.offsets[k]), int(p.offsets[k + 1])), engine.true_fisher(b)[0]

    product = curvature_product(engine, part, s, p.tb)
    ctx = Context(part=part, n=n, v=p.v, sq_u=p.sq_u, vg_u=p.vg_u, lam=p.lam, chunks=chunks,
                  kept=bool(p.keep_call.all()), needed_bytes=p.need, curvature=s.curvature,
                  product=product, factors=p.factors,
                  curvature_chunks=drawn_chunks if labels_drawn(s) else None)
    # peak memory of each phase above what it started with (`memory.Peak`: the device's
    # where it reports memory, else the process's resident set)
    with Peak() as peak_pre:
        h = est.precondition(ctx)
        phase("precondition", h)
    finalize = getattr(est, "finalize", None)   # e.g. cosine: divide by ||g_i||
    with Peak() as peak_score:
        error = (ihvp_error(ctx, p.v if h is None else h, ref)
                 if ref is not None and finalize is None else None)
        direct = h is not None and _direct(engine, h)
        unit_scores = (p.vg_u if h is None else core.to_units(
            jnp.concatenate(list(score_calls(engine, p, h, direct))), p.onehot))
        if finalize is not None:
            unit_scores = finalize(ctx, unit_scores)
        layer_nML = to_host(jnp.sum(unit_scores, -1), np.float64)[input_order(p.tb, n)]
        per_val_layers = None
        if s.per_val:
            per_val_layers = layer_nML[:, input_order(p.vb, m)]
            per_example = per_val_layers.mean(1)
        else:
            per_example = layer_nML[:, 0]
        phase("score", layer_nML)
    if (per_example > 0).all():
        note("every per-example score is positive: the '+ve' and 'all' layer scores are equal")
    return LayerScores(
        layer_scores=np.asarray(aggregate(per_example, s.aggregate)), per_example=per_example,
        aggregate=s.aggregate, estimator=est.name, unit=part.unit, n_train=n, n_val=m,
        lambdas=to_host(p.lam), unit_names=part.unit_names,
        seconds=p.seconds + time.perf_counter() - t0,
        gradients_kept=bool(p.keep_call.all()), per_val_layers=per_val_layers,
        layer_ids=part.layer_ids,
        meta={**meta, "engine": engine.name, **engine.describe(p.tb + p.vb),
              "calls": len(p.tb) + len(p.vb),
              "materialised_bytes": int(4 * p.d_total * np.diff(p.offsets)[p.keep_call].sum()),
              "needed_bytes": p.need,
              "kept_examples": int(sum((b.index >= 0).sum()
                                       for b, k in zip(p.tb, p.keep_call) if k)),
              "recomputed_calls": int((~p.keep_call).sum()),
              **({"direct_score_calls": int((~p.keep_call).sum()) if direct else 0}
                 if h is not None else {}),
              "damping": "adaptive" if s.damping is None else s.damping,
              **({"hutchinson_probes": HUTCHINSON_PROBES}
                 if s.damping == "mean_eigenvalue" and s.curvature != "empirical_fisher"
                 else {}),
              "damping_scale": s.damping_scale, "curvature": s.curvature,
              "phase_seconds": phases,
              "phase_peak_bytes": {"precondition": peak_pre.bytes, "score": peak_score.bytes,
                                   "source": peak_pre.source},
              **({"estimator_report": ctx.report} if ctx.report else {}),
              **({"ihvp_error_vs_exact": error} if error is not None else {})}), h
