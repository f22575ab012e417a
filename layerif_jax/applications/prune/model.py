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
from .masks import PRECISION, apply_magnitude, apply_wanda, check_nm, count_zeros, wanda_score
from .sparsegpt import sparsegpt_core, sparsegpt_counts

__all__ = ["METHODS", "DEFAULT_EPSILON", "prune_model", "global_sparsity", "outlier_ratios",
           "alpha_per_matrix"]

METHODS = ("magnitude", "wanda", "sparsegpt")


DEFAULT_EPSILON = {"magnitude": 0.3, "wanda": 0.1, "sparsegpt": 0.1}  # METHOD.md section 5


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


def _check_prune_args(model, sparsities, method: str, nm, blocksize: int):
    """(N:M tuple or None, one sparsity per matrix) after checking every argument."""
    if method not in METHODS:
        raise LayerIFError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    _no_lora(model)
    cfg = model.cfg
    L = cfg.num_layers
    nmt = None
    if nm is not None:
        nmt = check_nm(nm)
        for name in LINEARS:
            check_nm(nmt, cfg.linear_shape(name)[0], what=name)
        if method == "sparsegpt" and blocksize % nmt[1]:
            raise LayerIFError(f"blocksize {blocksize} is not a multiple of M={nmt[1]}")
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


def _prune_matrix(W, s: float, method: str, nmt, stats, n_tok: int, what: str, *,
                  blocksize: int, percdamp: float):
    """One kernel W [d_in, d_out] pruned to sparsity s (or N:M): (new W, zeros in it).
    `stats` holds the calibration statistics of its input ("sq", "xtx"). The number of
    weights the mask removes is checked against the method's own count."""
    if s == 0.0:
        return W, int(count_zeros(W))
    d_in, d_out = W.shape
    if method == "magnitude":
        expect = (W.size * nmt[0] // nmt[1]) if nmt else int(round(s * W.size))
        Wn, got, zeros = apply_magnitude(W, expect, nm=nmt)
    elif method == "wanda":
        k = None if nmt else int(round(s * d_in))
        Wn, got, zeros = apply_wanda(W, stats["sq"], 0 if k is None else k, nm=nmt)
        expect = (W.size * nmt[0] // nmt[1]) if nmt else k * d_out
    else:
        Wn, _, got, zeros, finite = sparsegpt_core(
            W, 2.0 * stats["xtx"] / n_tok, jnp.float32(0.0 if nmt else s),
            jnp.float32(percdamp), blocksize=min(blocksize, d_in), nm=nmt)
        if not bool(finite):
            raise LayerIFError(f"{what}: SparseGPT produced non-finite weights (raise "
                               "percdamp or add calibration data)")
        expect = (W.size * nmt[0] // nmt[1]) if nmt else \
            sparsegpt_counts(d_in, d_out, s, blocksize)
    got, zeros = int(got), int(zeros)
    if got != expect:
        raise RuntimeError(f"{what}: mask prunes {got} weights, expected {expect}")
    if zeros < expect:
        raise RuntimeError(f"{what}: only {zeros} zeros after pruning, expected at least "
                           f"{expect}")
    return Wn, zeros


def prune_model(model, sparsities: Sequence[float] | None, method: str, calib_ids=None, *,
                nm=None, batch_size: int = 8, blocksize: int = 128, percdamp: float = 0.01,
                progress: bool = False):
    """Prune every linear map of `model` in place.

    sparsities: one per matrix in model order (7 * L; 0 leaves a matrix dense), or
    None with `nm`. calib_ids: int [N, T] calibration token windows (not needed for
    magnitude). Returns (model, report) with report {"layers.l.name": achieved
    sparsity} (fraction of exact zeros in the pruned kernel).
    """
    nmt, s_all = _check_prune_args(model, sparsities, method, nm, blocksize)
    L = model.cfg.num_layers
    names = model.cfg.matrix_names()
    report: dict[str, float] = {}
    new_kernels: dict[str, list] = {n: [] for n in LINEARS}

    def prune_block(l, p, stats, n_tok):
        p = dict(p)
        for j, name in enumerate(LINEARS):
            W = p[name]["kernel"]
            Wn, zeros = _prune_matrix(
                W, float(s_all[7 * l + j]), method, nmt,
                None if stats is None else stats[INPUT_OF[name]], n_tok, names[7 * l + j],
                blocksize=blocksize, percdamp=percdamp)
            report[names[7 * l + j]] = zeros / W.size
            p[name] = dict(p[name], kernel=Wn)
            new_kernels[name].append(Wn)
        return p

    if method == "magnitude":
        from tqdm.auto import tqdm
        for l in tqdm(range(L), desc="prune magnitude", unit="block", disable=not progress,
                      leave=False):
            prune_block(l, _block_arrays(model, l), None, 0)
    else:
        _walk_blocks(model, calib_ids, prune_block, need_h=method == "sparsegpt",
                     batch_size=batch_size, progress=progress, desc=f"prune {method}")
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
