"""The two entry points: `influence_scores` (any loss, any pytree of parameters) and
`layer_scores` (an NNX model; the project's decoders take the packed fast path)."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .. import checksum
from .. import sharding as shd
from ..data import Example
from ..errors import LayerIFError
from ..io import parse_bytes
from ..loss import example_losses
from ..ops import remat_mode
from . import driver
from .distributed import ExampleShard, gather_host, shard_digest
from .driver import LayerScores, Settings
from .engines.general import (GeneralEngine, OutputLoss, check_curvature, draw_next_tokens,
                              num_examples)
from .engines.kronecker import KronEngine, parse_kron
from .engines.packed import PackedEngine, supports as packed_supports
from .estimators import get_estimator
from .partition import make_partition, path_str

ENGINES = ("auto", "packed", "vmap")


def resolve_mesh(mesh, sharding: str = "dp"):
    """'auto': every device on the data axis (None with one device); "DxM" (e.g. "2x4"):
    a ("data", "model") mesh of the devices; a Mesh as given. A 2-D mesh needs a sharded
    preset (`layerif_jax.sharding`); so does a model axis."""
    shd.check_preset(sharding)
    if isinstance(mesh, str) and mesh != "auto":
        mesh = shd.make_mesh(mesh)
    elif mesh == "auto":
        devs = jax.devices()
        if len(devs) == 1:
            return None
        mesh = Mesh(np.array(devs), ("data",)) if sharding == "dp" else shd.make_mesh("auto")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise LayerIFError(f"mesh must be a jax.sharding.Mesh, 'auto', 'DxM' or None, got "
                           f"{mesh!r}")
    if mesh is not None and mesh.devices.ndim != 1:
        shd.check_mesh(mesh, sharding)
    return mesh


def _settings(estimator, aggregate, damping, damping_scale, per_val, memory_budget,
              skip_zero_units, progress, estimator_options, curvature) -> Settings:
    """A name, or several (a list or tuple: all of them run on the same gradients, the
    options then a {name: options} dict)."""
    several = not isinstance(estimator, str)
    if several:
        names = list(estimator)
        if not names or len(set(names)) != len(names):
            raise LayerIFError(f"estimator: give one name or several distinct names, got "
                               f"{estimator!r}")
        opts = estimator_options or {}
        bad = sorted(set(opts) - set(names))
        if bad:
            raise LayerIFError(f"estimator_options names {', '.join(map(repr, bad))}, which "
                               f"is not among the estimators {', '.join(names)}")
        ests = tuple(get_estimator(nm, **opts.get(nm, {})) for nm in names)
    else:
        ests = (get_estimator(estimator, **(estimator_options or {})),)
    return Settings(ests[0], aggregate, damping, damping_scale, per_val,
                    None if memory_budget is None else parse_bytes(memory_budget, "memory budget"),
                    skip_zero_units, progress, curvature, ests if several else ())


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise LayerIFError(f"chunk size must be an integer >= 1, got {chunk_size!r}")


def influence_scores(loss_fn: Callable, params, train, val, *, layer_of, unit: str = "tensor",
                     estimator: str = "datainf", aggregate: str = "+ve", per_val: bool = False,
                     memory_budget=None, mesh="auto", chunk_size: int = 8,
                     damping: float | str | None = None, damping_scale: float = 0.1,
                     skip_zero_units: bool = False, progress: bool = False,
                     estimator_options: dict | None = None,
                     curvature: str = "empirical_fisher", projection: int | None = None,
                     projection_seed: int = 0, checkpoint_dir=None,
                     checkpoint_every: int = 8) -> LayerScores:
    """Per-example, per-layer influence of `train` on `val` for any JAX model.

    loss_fn(params, example) -> scalar: the loss of ONE example, an example being one
    slice of the `train` / `val` pytrees along their leading axis. params: the pytree of
    parameters to attribute over (LoRA factors, a small model's weights, a classifier
    head...). layer_of: which layer each parameter belongs to: a regex with one integer
    group on the dotted path (r"layers\\.(\\d+)\\."), a callable path -> int | None (None:
    not attributed), or "stacked" (leaves with a leading layer axis); see `partition`.
    unit: "tensor" | "module" | "block", the units of inversion. estimator: a name in
    `estimators.ESTIMATORS` ("datainf", "identity", "exact"). Per-example gradients are
    `vmap(grad)` over chunks of `chunk_size` examples; `memory_budget` (bytes or "8GB")
    bounds the kept gradients (the rest is recomputed); `mesh` shards the examples.
    damping: a fixed lambda, None ("adaptive": damping_scale x mean ||g_i,b||^2 / d_b, per
    unit, DataInf's) or "mean_eigenvalue" (damping_scale x tr(C_b) / d_b of the run's
    curvature; the same as adaptive for the empirical Fisher, Hutchinson otherwise).
    curvature: what H_b is -- "empirical_fisher" (G_b = (1/n) sum_i g g^T, default),
    "hessian" (forward-over-reverse products of the loss), "gauss_newton" (J^T H_out J;
    pass `loss_fn=OutputLoss(output_fn, loss_of_output)`) or "true_fisher" (the empirical
    Fisher of gradients at labels drawn from the model, one draw per example, as
    Kronfluence's; its expectation is the Gauss-Newton matrix of a log-likelihood loss;
    pass `OutputLoss(output_fn, loss_of_output, sample)`, e.g. `sample_label("y")`); all
    but the empirical Fisher go with the estimators that work from products (cg, lissa,
    arnoldi, exact), per unit.
    projection: k, to map every unit's per-example gradients to k random directions
    (TRAK-style JL, `engines.projected`) before any estimator sees them -- for the full
    weights of large layers.
    Returns a `LayerScores`: score[i, l] = v_l . (H_l + lambda I)^-1 g_i,l, positive =
    beneficial, and the layer scores S_l of `aggregate`. With several estimators
    (`estimator=["datainf", "cg"]`, options {name: {...}}) all run on the same gradients
    and a {name: LayerScores} comes back; where some fail on their own (an iterative one
    that does not converge) the others still run and `errors.EstimatorsFailed` is raised
    at the end, holding their results (`.results`) and each failure (`.failures`).
    checkpoint_dir: a folder the gradient passes are saved to every `checkpoint_every`
    training calls; the same call after a kill resumes from it (`resume`; another
    model, data or settings are refused). The loss function's code is not
    fingerprinted, only its name: keep the folder to one loss.
    """
    _check_chunk(chunk_size)
    s = _settings(estimator, aggregate, damping, damping_scale, per_val, memory_budget,
                  skip_zero_units, progress, estimator_options, curvature)
    ckpt = _checkpoint(checkpoint_dir, checkpoint_every)
    part = make_partition(params, unit, layer_of)
    if (isinstance(mesh, Mesh) and mesh.devices.ndim != 1) or (
            isinstance(mesh, str) and mesh != "auto"):
        raise LayerIFError("influence_scores splits the examples over a 1-D mesh (its "
                           "parameters whole on every device); sharded parameters are "
                           "layer_scores(..., sharding=...) on the project's decoders")
    m = resolve_mesh(mesh)
    check_curvature(loss_fn, curvature)
    engine, part = _maybe_projected(
        GeneralEngine(loss_fn, params, part, mesh=m, chunk_size=chunk_size), part,
        projection, projection_seed, curvature)
    n, nv = num_examples(train), num_examples(val)
    if not n or not nv:
        raise LayerIFError("influence needs at least one training and one validation example")
    identity = None if ckpt is None else {
        "loss": _name_of(loss_fn),
        "params": checksum.identity_digest(jax.tree.leaves(params)),
        "train": _tree_digest(train), "val": _tree_digest(val), "unit": unit,
        "projection": projection, "projection_seed": projection_seed, "curvature": curvature}
    return driver.run(engine, part, train, val, n, nv, s,
                      {"devices": 1 if m is None else m.devices.size}, ckpt, identity)


def _checkpoint(path, every):
    from .resume import Checkpoint
    if path is None or isinstance(path, Checkpoint):
        return path
    return Checkpoint(path, every)


def _name_of(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _tree_digest(tree) -> str:
    import hashlib
    h = hashlib.sha256(str(jax.tree.structure(tree)).encode())
    for x in jax.tree.leaves(tree):
        h.update(checksum.array_digest(x).encode())
    return h.hexdigest()


def _maybe_projected(engine, part, projection, seed, curvature):
    """(engine, partition), projected when `projection` is given."""
    if projection is None:
        return engine, part
    if parse_kron(projection) is not None:
        raise LayerIFError(f"projection={projection!r} reads each layer's inputs and output "
                           "gradients: it runs in layer_scores with one of the project's "
                           "decoders (packed engine); a general loss takes an integer k")
    if curvature != "empirical_fisher":
        raise LayerIFError("projection goes with the empirical Fisher of the projected "
                           f"gradients, not curvature={curvature!r}")
    from .engines.projected import ProjectedEngine
    eng = ProjectedEngine(engine, part, projection, seed)
    return eng, eng.part


# -- NNX models ----------------------------------------------------------------------------

_FIRST_INDEX = r"(?:^|\.)(\d+)(?:\.|$)"


def _auto_layer_of(params, filt) -> str:
    """An integer path component (an nnx.List index) names the layer; otherwise every
    leaf must share a leading layer axis ("stacked")."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise LayerIFError(f"the model has no parameters matching {filt} (for LoRA: attach "
                           "or load an adapter first)")
    paths = [path_str(p) for p, _ in flat]
    if all(re.search(_FIRST_INDEX, p) for p in paths):
        return _FIRST_INDEX
    lead = {np.shape(x)[0] if np.ndim(x) else None for _, x in flat}
    if len(lead) == 1 and None not in lead and not any(re.search(_FIRST_INDEX, p) for p in paths):
        return "stacked"
    odd = next(p for p in paths if not re.search(_FIRST_INDEX, p))
    raise LayerIFError(f"cannot tell the layer of {odd}: pass layer_of (a regex with one "
                       "integer group, a callable path -> layer, or 'stacked')")


def _check_adapter(params) -> None:
    bs = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if "lora_b" in path_str(p)]
    if bs and all(not bool(jnp.any(b != 0)) for b in bs):
        raise LayerIFError(
            "the LoRA adapter is freshly initialised (every B is zero, so every A-gradient is "
            "zero and influence is degenerate): fine-tune it first or load a trained adapter")


@functools.lru_cache(maxsize=16)
def _nnx_loss(graphdef, example_loss: Callable | None, dtype):
    """loss(params, rest, example) of a split NNX model: `example_loss(model, example)`,
    or the mean token cross-entropy of an LM example {"ids", "targets"}, split at the
    logits (an `OutputLoss`: the Gauss-Newton and true Fisher curvatures; its `sample`
    draws every next token from the model). Cached, so that repeated calls reuse one
    compiled function."""
    if example_loss is not None:
        def loss(params, rest, example):
            return example_loss(nnx.merge(graphdef, params, rest), example)
        return loss

    def logits(params, rest, example):
        model, ids = nnx.merge(graphdef, params, rest), example["ids"][None]
        return model(ids) if dtype is None else model(ids, dtype=dtype)

    def nll(logits_1TV, example):      # labels: the ids (position t predicts ids[t + 1])
        return example_losses(logits_1TV, example["ids"][None], example["targets"][None])[0]

    def sample(logits_1TV, example, key):   # the packed engine's draws (K-FAC) too
        T = logits_1TV.shape[1] - 1
        drawn = draw_next_tokens(key, jnp.arange(T), logits_1TV[0, :-1])
        return {**example, "ids": jnp.concatenate([example["ids"][:1],
                                                   drawn.astype(example["ids"].dtype)])}
    return OutputLoss(logits, nll, sample)


def lm_buckets(examples: Sequence[Example], multiple: int):
    """[(dataset {"ids", "targets"} [n_b, T_b], input indices)] by length buckets of
    `multiple` tokens, right-padded (exact for causal models)."""
    lengths = np.array([len(e.ids) for e in examples])
    bucket = -(-lengths // multiple) * multiple
    out = []
    for T in sorted(set(bucket.tolist())):
        idx = np.flatnonzero(bucket == T)
        ids = np.zeros((len(idx), T), np.int32)
        tgt = np.zeros((len(idx), T), bool)
        for r, i in enumerate(idx):
            t = len(examples[i].ids)
            ids[r, :t], tgt[r, :t] = examples[i].ids, examples[i].targets
        out.append(({"ids": ids, "targets": tgt}, idx))
    return out


def layer_scores(model, train, val, *, params=nnx.LoRAParam, loss_fn: Callable | None = None,
                 layer_of="auto", engine: str = "auto", estimator: str = "datainf",
                 aggregate: str = "+ve", unit: str = "tensor",
                 damping: float | str | None = None, damping_scale: float = 0.1,
                 per_val: bool = False, chunk_size: int = 8,
                 memory_budget="8GB", dtype=None, mesh="auto", row_len: int | None = None,
                 bucket_multiple: int = 32, skip_zero_units: bool = False,
                 chunks_per_call: int = 4, progress: bool = False,
                 estimator_options: dict | None = None,
                 curvature: str = "empirical_fisher", projection: int | None = None,
                 projection_seed: int = 0, checkpoint_dir=None,
                 checkpoint_every: int = 8, sharding: str = "dp",
                 remat: bool | str = False) -> LayerScores:
    """Per-example, per-layer influence scores and the LayerIF layer scores S^(l) of an
    NNX model.

    model: any `nnx.Module`; the attributed parameters are those matching the `params`
    filter (default `nnx.LoRAParam`). Layers: `layer_of` ("auto": an integer in the
    path, as for layers in an `nnx.List`, or a leading layer axis; else see
    `influence_scores`). train / val: tokenised LM examples (`data.tokenize`; default
    loss: the mean token cross-entropy of `model(ids_1T)` on right-padded ids), or any
    pytrees with a leading example axis when `loss_fn(model, example)` is given. In a
    multi-process run (packed engine) each may be this process's share only, a
    `distributed.ExampleShard` of the examples `distributed.shard_indices(n, mesh)` names:
    each process then tokenises, packs and puts only its own.
    engine: "packed" (the project's decoders: several examples per row, one backward per
    chunk, LoRA only), "vmap" (the general path: vmap(grad) over chunks; for LM examples,
    length buckets of `bucket_multiple`), or "auto" (packed where it applies).
    dtype: compute dtype of the forward/backward of the project's decoders (influence sums
    stay float32). damping: a fixed lambda (default: adaptive per unit, damping_scale x
    mean ||g||^2 / d). chunks_per_call: packed chunks per compiled call. mesh: 'auto'
    shards the examples over all devices, "DxM" (e.g. "2x4") or a ("data", "model") Mesh
    a 2-D mesh, None: one device. sharding (packed engine): "dp" (parameters whole on
    every device), "fsdp" (their hidden dimension split over "data" too) or "fsdp_tp"
    (also heads, MLP and vocabulary over "model"); the table is `layerif_jax.sharding`.
    remat (packed engine): recompute the blocks in the backward (less memory per call,
    `ops.layer_remat`): True or "mlp" keeps each block's attention projections and
    output and recomputes its MLP (about +25% FLOPs); "full" keeps only the residual
    stream between blocks (about +50%). The scores do not depend on it.
    estimator, estimator_options, curvature, projection: as in `influence_scores` (several
    estimators give a {name: LayerScores} from one set of gradients); projection
    "kron:K" or "kron:KINxKOUT" (packed engine, data parallel): the FULL weight of every
    linear map of every block, its per-example gradient projected from both sides as
    LoGra does (`engines.kronecker`: from each token's input and output gradient, never
    formed whole), one [K_in, K_out] unit per map and layer; the model needs no LoRA.
    checkpoint_dir, checkpoint_every: the gradient passes saved every that many calls and
    resumed after a kill (`resume`); a folder of another model (base weights or
    adapter), data or settings is refused.
    """
    _check_chunk(chunk_size)
    if engine not in ENGINES:
        raise LayerIFError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    sharded = isinstance(train, ExampleShard) or isinstance(val, ExampleShard)
    if sharded:
        _check_shards(train, val)
    elif not len(jax.tree.leaves(train)) or not len(jax.tree.leaves(val)):
        raise LayerIFError("influence needs at least one training and one validation example")
    s = _settings(estimator, aggregate, damping, damping_scale, per_val, memory_budget,
                  skip_zero_units, progress, estimator_options, curvature)
    ckpt = _checkpoint(checkpoint_dir, checkpoint_every)
    lm = sharded or (isinstance(train, (list, tuple)) and train
                     and isinstance(train[0], Example))

    def digest(x):
        if isinstance(x, ExampleShard):
            return shard_digest(x, checksum.examples_digest)
        return checksum.examples_digest(x) if lm else _tree_digest(x)

    identity = None if ckpt is None else {
        "model": checksum.identity_digest(jax.tree.leaves(nnx.state(model))),
        "train": digest(train), "val": digest(val),
        "loss": None if loss_fn is None else _name_of(loss_fn),
        "params": str(params), "layer_of": str(layer_of), "unit": unit, "dtype": str(dtype),
        "projection": projection, "projection_seed": projection_seed, "curvature": curvature}
    packed_ok = (lm and loss_fn is None and params is nnx.LoRAParam and layer_of in ("auto", "stacked")
                 and packed_supports(model))
    kron = parse_kron(projection)
    # K-FAC / EK-FAC alone take the true Fisher on the packed engine (their factors from
    # drawn labels); every other curvature product needs the vmap engine
    drawn_ok = driver.labels_drawn(s)
    if curvature != "empirical_fisher" and engine == "packed" and not drawn_ok:
        raise LayerIFError(f"curvature={curvature!r} needs engine='vmap' (the packed engine "
                           "gives per-example gradients, not curvature products; it takes "
                           "the true Fisher for kfac and ekfac only)")
    if kron is not None and (engine == "vmap" or not packed_ok
                             or curvature != "empirical_fisher" or sharding != "dp"):
        raise LayerIFError(f"projection={projection!r} needs the packed engine, data parallel "
                           "(sharding='dp'), with the empirical Fisher: one of the project's "
                           "decoders, tokenised examples, the default params and loss")
    if projection is not None and kron is None and engine == "packed":
        raise LayerIFError("a Gaussian projection (an integer k) needs engine='vmap'; the "
                           "packed engine projects with 'kron:K'")
    if (curvature != "empirical_fisher" and not drawn_ok) or (projection is not None
                                                              and kron is None):
        packed_ok = False
    if engine == "packed" and not packed_ok:
        raise LayerIFError("engine='packed' needs one of the project's decoders, tokenised "
                           "examples, LoRA parameters and the default loss: use engine='vmap'")
    if sharded and (engine == "vmap" or not packed_ok):
        raise LayerIFError("examples given as a process's shard need the packed engine (the "
                           "project's decoders, LoRA, the default loss); pass every example "
                           "to the vmap engine")
    m = resolve_mesh(mesh, sharding)
    try:
        remat = remat_mode(remat)
    except ValueError as e:
        raise LayerIFError(str(e)) from None
    if remat and not (engine != "vmap" and packed_ok):
        raise LayerIFError("remat=True needs the packed engine (the project's decoders, "
                           "tokenised examples, LoRA, the default loss)")
    if sharding != "dp" and not (engine != "vmap" and packed_ok):
        raise LayerIFError(f"sharding={sharding!r} needs the packed engine (the project's "
                           "decoders, tokenised examples, LoRA, the default loss); the vmap "
                           "engine takes sharding='dp'")
    dt = jnp.dtype(dtype) if dtype is not None else None
    meta = {"devices": 1 if m is None else m.devices.size,
            "dtype": str(dt or getattr(model, "dtype", "float32")), "remat": remat,
            "processes": jax.process_count()}
    if engine != "vmap" and packed_ok:
        kw = dict(dtype=dt, mesh=m, chunk_size=chunk_size, row_len=row_len,
                  chunks_per_call=chunks_per_call, sharding=sharding, remat=remat)
        if kron is not None:   # the full weights, projected: no adapter needed
            eng = KronEngine(model, k_in=kron[0], k_out=kron[1], seed=projection_seed, **kw)
            part = make_partition(eng.projected, unit, "stacked")
        else:
            eng = PackedEngine(model, **kw)
            _check_adapter(eng.params)
            part = make_partition(eng.params, unit, "stacked")
        if sharded:
            # how many examples each process read (tokenised, packed and put)
            meta["examples_read"] = {k: [int(a[0]) for a in gather_host(np.array(
                [len(x.examples) if isinstance(x, ExampleShard) else len(x)]))]
                for k, x in (("train", train), ("val", val))}
        whole = lambda x: x if isinstance(x, ExampleShard) else list(x)   # noqa: E731
        count = lambda x: x.total if isinstance(x, ExampleShard) else len(x)   # noqa: E731
        return driver.run(eng, part, whole(train), whole(val), count(train), count(val), s,
                          meta, ckpt, identity)
    graphdef, p, rest = nnx.split(model, params, ...)
    if params is nnx.LoRAParam:
        _check_adapter(p)
    part = make_partition(p, unit, _auto_layer_of(p, params) if layer_of == "auto" else layer_of)
    if loss_fn is None and not lm:
        raise LayerIFError("train/val are not tokenised LM examples: pass loss_fn(model, example)")
    if curvature in ("gauss_newton", "true_fisher") and loss_fn is not None:
        raise LayerIFError(f"curvature={curvature!r} needs the loss split at the model's output: "
                           "layer_scores splits its own LM loss (loss_fn=None); for your "
                           "own loss use influence_scores with an OutputLoss")
    eng, part = _maybe_projected(
        GeneralEngine(_nnx_loss(graphdef, loss_fn, dt), p, part, mesh=m,
                      chunk_size=chunk_size, const=rest), part, projection, projection_seed,
        curvature)
    if lm and loss_fn is None:
        return driver.run(eng, part, lm_buckets(train, bucket_multiple),
                          lm_buckets(val, bucket_multiple), len(train), len(val), s, meta,
                          ckpt, identity)
    if lm:
        train, val = _as_dataset(train), _as_dataset(val)
    return driver.run(eng, part, train, val, num_examples(train), num_examples(val), s, meta,
                      ckpt, identity)


def _check_shards(train, val) -> None:
    """Example shards (this process's share of a set) that together hold every example
    of the set once, tokenised; checked on what every process gathers, so that all of
    them refuse together (none is left waiting in a collective)."""
    for what, x in (("training", train), ("validation", val)):
        if not isinstance(x, ExampleShard):
            if not len(x):
                raise LayerIFError(f"influence needs at least one {what} example")
            continue
        ok = all(isinstance(e, Example) for e in x.examples)
        info = np.concatenate(gather_host(np.array([int(ok), x.total], np.int64)))
        every = np.sort(np.concatenate(gather_host(np.asarray(x.index, np.int64))))
        if not info[0::2].all():
            raise LayerIFError(f"a {what} shard holds tokenised examples (data.Example)")
        if len(set(info[1::2].tolist())) != 1 or x.total < 1:
            raise LayerIFError(f"the processes' {what} shards disagree on the set's size "
                               f"({sorted(set(info[1::2].tolist()))}) or it is empty")
        if not np.array_equal(every, np.arange(x.total)):
            raise LayerIFError(f"the processes' {what} shards must together hold each of "
                               f"the {x.total} examples once (distributed.shard_indices)")


def _as_dataset(examples: Sequence[Example]) -> dict[str, Any]:
    """Tokenised examples as one right-padded dataset {"ids", "targets"} [n, T_max]."""
    return lm_buckets(examples, max(len(e.ids) for e in examples))[0][0]
