"""Pruning a whole model block by block, calibrated through the already pruned blocks;
its sparsity, OWL outlier ratios and PL_Alpha_Hill per matrix."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import LayerIFError
from ...models.config import LINEARS
from ...models.decoder import INPUT_OF, attention_bias, block_fn, recording_lins, rope_inv_freq
from ...stop import check as check_stop
from .masks import PRECISION, check_nm, count_zeros, wanda_score
from .methods import PRUNERS, get_pruner

__all__ = ["METHODS", "DEFAULT_EPSILON", "prune_model", "global_sparsity", "outlier_ratios",
           "alpha_per_matrix"]

METHODS = tuple(PRUNERS)  # the built-in pruners (applications/prune/methods/)
DEFAULT_EPSILON = {n: c.default_epsilon for n, c in PRUNERS.items()}  # METHOD.md section 5


def _block_arrays(model, l: int) -> dict[str, Any]:
    return jax.tree.map(lambda a: a[l], model.layers.layer_arrays())


def _no_lora(model) -> None:
    if any(lin.lora_a is not None for lin in model.layers.linears().values()):
        raise LayerIFError("the model carries LoRA adapters: merge them (merge_lora) "
                           "before pruning")


_STEPS: dict[tuple[str, bool], Callable] = {}


def _make_block_step(cfg, need_h: bool, window: int | None):
    """jit: (block params, x [B, T, D]) -> (block output, {input kind: stats}) for a
    block attending over `window` (None: full).

    Cached per configuration (ModelConfig may hold lists, so keyed by its repr).
    """
    key = (repr(cfg), need_h, window)
    if key not in _STEPS:
        _STEPS[key] = _block_step(cfg, need_h, window)
    return _STEPS[key]


def _block_step(cfg, need_h: bool, window: int | None):

    def step(p, x):
        B, T, _ = x.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        bias = attention_bias(jnp.ones((B, T), bool), pos, window)
        rec: dict[str, jax.Array] = {}
        y = block_fn(cfg)(cfg, p, x, bias, pos, rope_inv_freq(cfg),
                          recording_lins(p, rec, x.dtype), x.dtype)
        stats = {}
        for kind, h in rec.items():
            hf = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
            st = {"sq": jnp.sum(hf * hf, axis=0)}
            if need_h:
                st["xtx"] = jnp.matmul(hf.T, hf, precision=PRECISION)
            stats[kind] = st
        return y, stats

    return jax.jit(step)


def _check_calib(calib_ids, cfg) -> np.ndarray:
    if calib_ids is None:
        raise LayerIFError("this pruning method needs calibration data (calib_ids)")
    ids = np.asarray(calib_ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise LayerIFError(f"calibration ids must be [N, T], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise LayerIFError(f"calibration ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise LayerIFError(f"calibration ids outside the vocabulary [0, {cfg.vocab_size})")
    return ids.astype(np.int32)


def _walk_blocks(model, calib_ids, visit: Callable[[int, dict, dict, int], dict], *,
                 need_h: bool, batch_size: int, progress: bool, desc: str) -> None:
    """Run the calibration batches block by block.

    For block l: collect statistics of every linear map's input over all batches,
    call `visit(l, block_params, stats, n_tokens)` -> params to forward with (the
    pruned block), then push the batches through that block.
    """
    cfg = model.cfg
    ids = _check_calib(calib_ids, cfg)
    if batch_size < 1:
        raise LayerIFError(f"batch size must be >= 1, got {batch_size}")
    xs = [model.embed(jnp.asarray(ids[i:i + batch_size]))
          for i in range(0, ids.shape[0], batch_size)]
    n_tok = int(ids.size)
    from tqdm.auto import tqdm
    for l in tqdm(range(cfg.num_layers), desc=desc, unit="block", disable=not progress,
                  leave=False):
        check_stop()
        step = _make_block_step(cfg, need_h, cfg.window_of(l))
        p = _block_arrays(model, l)
        total = None
        for x in xs:
            _, st = step(p, x)
            total = st if total is None else jax.tree.map(jnp.add, total, st)
        p = visit(l, p, total, n_tok)
        if l + 1 < cfg.num_layers:
            xs = [step(p, x)[0] for x in xs]


def _check_prune_args(model, sparsities, pruner, nm):
    """(N:M tuple or None, one sparsity per matrix) after checking every argument."""
    _no_lora(model)
    cfg = model.cfg
    L = cfg.num_layers
    nmt = None
    if nm is not None:
        nmt = check_nm(nm)
        for name in LINEARS:
            check_nm(nmt, cfg.linear_shape(name)[0], what=name)
    pruner.check(nmt)
    if sparsities is None:
        if nmt is None:
            raise LayerIFError("sparsities are required (or give nm=(N, M))")
        return nmt, np.full(7 * L, nmt[0] / nmt[1])
    s_all = np.asarray(sparsities, np.float64).reshape(-1)
    if s_all.size != 7 * L:
        raise LayerIFError(f"expected {7 * L} sparsities (7 per block x {L} blocks), "
                           f"got {s_all.size}")
    if not np.all(np.isfinite(s_all)) or (s_all < 0).any() or (s_all >= 1).any():
        raise LayerIFError("every sparsity must be in [0, 1)")
    if nmt is not None and np.abs(s_all - nmt[0] / nmt[1]).max() > 1e-9:
        raise LayerIFError(f"{nmt[0]}:{nmt[1]} pruning fixes every sparsity at "
                           f"{nmt[0] / nmt[1]:g}: use the uniform allocation")
    return nmt, s_all


def _prune_matrix(pruner, W, s: float, nmt, stats, n_tok: int, what: str):
    """One kernel pruned by `pruner`: (new W, zeros in it), the number of weights its
    mask removed checked against the pruner's own count."""
    if s == 0.0 and nmt is None:
        return W, int(count_zeros(W))
    try:
        Wn, got, zeros, expect = pruner.prune(W, s, nmt, stats, n_tok)
    except LayerIFError as e:
        raise LayerIFError(f"{what}: {e}") from None
    got, zeros = int(got), int(zeros)
    if got != expect:
        raise RuntimeError(f"{what}: mask prunes {got} weights, expected {expect}")
    if zeros < expect:
        raise RuntimeError(f"{what}: only {zeros} zeros after pruning, expected at least "
                           f"{expect}")
    return Wn, zeros


def prune_model(model, sparsities: Sequence[float] | None, method, calib_ids=None, *,
                nm=None, batch_size: int = 8, progress: bool = False, **options):
    """Prune every linear map of `model` in place.

    method: a pruner's name (`METHODS`: magnitude, wanda, sparsegpt) with its `options`
    (SparseGPT: blocksize, percdamp), or a pruner object (`methods.Pruner`).
    sparsities: one per matrix in model order (7 * L; 0 leaves a matrix dense), or
    None with `nm`. calib_ids: int [N, T] calibration token windows (not needed by a
    pruner whose `calibration` is None). Returns (model, report) with report
    {"layers.l.name": achieved sparsity} (fraction of exact zeros in the pruned kernel).
    """
    pruner = get_pruner(method, **options) if isinstance(method, str) else method
    if not isinstance(method, str) and options:
        raise LayerIFError("options go with a pruner's name, not with a pruner object")
    nmt, s_all = _check_prune_args(model, sparsities, pruner, nm)
    L = model.cfg.num_layers
    names = model.cfg.matrix_names()
    report: dict[str, float] = {}
    new_kernels: dict[str, list] = {n: [] for n in LINEARS}

    def prune_block(l, p, stats, n_tok):
        p = dict(p)
        for j, name in enumerate(LINEARS):
            W = p[name]["kernel"]
            Wn, zeros = _prune_matrix(
                pruner, W, float(s_all[7 * l + j]), nmt,
                None if stats is None else stats[INPUT_OF[name]], n_tok, names[7 * l + j])
            report[names[7 * l + j]] = zeros / W.size
            p[name] = dict(p[name], kernel=Wn)
            new_kernels[name].append(Wn)
        return p

    if pruner.calibration is None:
        from tqdm.auto import tqdm
        for l in tqdm(range(L), desc=f"prune {pruner.name}", unit="block",
                      disable=not progress, leave=False):
            check_stop()
            prune_block(l, _block_arrays(model, l), None, 0)
    else:
        _walk_blocks(model, calib_ids, prune_block, need_h=pruner.calibration == "xtx",
                     batch_size=batch_size, progress=progress, desc=f"prune {pruner.name}")
    for name, lin in model.layers.linears().items():
        lin.kernel.set_value(jnp.stack(new_kernels[name]).astype(lin.kernel[...].dtype))
    return model, report


def global_sparsity(model) -> float:
    """Fraction of zeros over all prunable matrices."""
    z = n = 0
    for lin in model.layers.linears().values():
        k = lin.kernel[...]
        z += int(jnp.sum(k == 0))
        n += k.size
    return z / n


def outlier_ratios(model, calib_ids, M: float = 5.0, *, batch_size: int = 8,
                   progress: bool = False) -> np.ndarray:
    """OWL's D_l per block: the fraction of Wanda scores |W_ij| * ||X_i||_2 over the
    block's seven matrices (pooled) above M times their mean. Dense model activations."""
    if not M > 0:
        raise LayerIFError(f"M must be > 0, got {M}")
    _no_lora(model)
    out = np.zeros(model.cfg.num_layers)

    def visit(l, p, stats, n_tok):
        scores = [(wanda_score(p[n]["kernel"], jnp.sqrt(stats[INPUT_OF[n]]["sq"]))).reshape(-1)
                  for n in LINEARS]
        allv = jnp.concatenate(scores)
        out[l] = float(jnp.mean(allv > M * jnp.mean(allv)))
        return p

    _walk_blocks(model, calib_ids, visit, need_h=False, batch_size=batch_size,
                 progress=progress, desc="OWL outliers")
    return out


def alpha_per_matrix(model, xmin: str = "peak") -> np.ndarray:
    """PL_Alpha_Hill of every prunable matrix, model order (7 * L values)."""
    from ..allocation import pl_alpha_hill
    kernels = {n: np.asarray(jax.device_get(lin.kernel[...]), np.float64)
               for n, lin in model.layers.linears().items()}
    out = []
    for l in range(model.cfg.num_layers):
        check_stop()
        out += [pl_alpha_hill(kernels[n][l], xmin=xmin) for n in LINEARS]
    return np.array(out)
