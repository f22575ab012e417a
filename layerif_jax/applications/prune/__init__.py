"""Post-training pruning (METHOD.md section 5): magnitude, Wanda and SparseGPT.

Conventions
-----------
* Kernels are in the model's layout `[d_in, d_out]` (y = x W). "Per output" means
  per output column j of the kernel, compared over its inputs i.
* A mask is a boolean array shaped like the weight, **True where the weight is
  pruned** (set to zero), as in the Wanda / SparseGPT reference code.
* Sparsity `s` prunes `round(s * n)` weights of a group of `n` candidates exactly
  (ties broken by position, so the count is always exact): the whole matrix for
  magnitude, each output column for Wanda, each block of `blocksize` inputs (all
  outputs) for SparseGPT.
* N:M (`nm=(N, M)`): N zeros in every M consecutive INPUTS of each output; the
  sparsity is then N/M (pass `sparsity=None` or exactly N/M).

`prune_model` prunes every q, k, v, o, gate, up, down matrix with its own sparsity
(model order, as `allocate.layer_sparsities` returns them); calibration activations
are taken block by block through the already-pruned preceding blocks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ...data import encode_text
from ...errors import LayerIFError
from ...stop import check as check_stop
from ...models.config import LINEARS
from ...models.decoder import INPUT_OF, attention_bias, block_fn, recording_lins, rope_inv_freq

METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_EPSILON = {"magnitude": 0.3, "wanda": 0.1, "sparsegpt": 0.1}  # METHOD.md section 5
_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------
def _check_nm(nm, d_in: int | None = None, what: str = "weight") -> tuple[int, int]:
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise LayerIFError(f"N:M must be a pair of integers like (2, 4), got {nm!r}") from None
    if not (m >= 2 and 1 <= n < m):
        raise LayerIFError(f"N:M pattern {n}:{m} is invalid: need 1 <= N < M")
    if d_in is not None and d_in % m:
        raise LayerIFError(f"{what} has {d_in} inputs, not divisible by M={m} for {n}:{m} pruning")
    return n, m


def _check_sparsity(sparsity, nm) -> float | None:
    """The sparsity to use (None under N:M)."""
    if nm is not None:
        n, m = _check_nm(nm)
        if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
            raise LayerIFError(f"{n}:{m} pruning fixes the sparsity at {n / m:g}, "
                               f"got sparsity {sparsity}")
        return None
    if sparsity is None:
        raise LayerIFError("sparsity is required (or give nm=(N, M))")
    s = float(sparsity)
    if not 0 < s < 1:
        raise LayerIFError(f"sparsity must be in (0, 1), got {sparsity}")
    return s


def _check_weight(W, what="weight") -> jax.Array:
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise LayerIFError(f"{what} must be a 2-D kernel [d_in, d_out], got shape {W.shape}")
    return W


def _rank(x: jax.Array, axis: int) -> jax.Array:
    """0-based rank of each entry along `axis` (stable: ties by position)."""
    return jnp.argsort(jnp.argsort(x, axis=axis, stable=True), axis=axis, stable=True)


# ---------------------------------------------------------------------------------
# masks (jitted cores take the count k as a traced value: no recompilation per sparsity)
# ---------------------------------------------------------------------------------
def _lowest_k(score: jax.Array, k, axis: int | None = None) -> jax.Array:
    """Mask of the k smallest entries of a NON-NEGATIVE score (over all entries, or along
    `axis` for every other index); ties go to the earlier position, as a stable sort would.

    Selection without sorting: for non-negative floats the int32 bit patterns are
    ordered like the values, so the k-th smallest value is found exactly by bisection
    on the bit pattern (31 vectorised counting passes, O(31 n)); XLA's CPU sort of a
    million entries is ~50x slower. k may be traced (no recompilation per sparsity).
    """
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32) + 0.0, jnp.int32)  # -0 -> +0
    red = dict(axis=axis, keepdims=axis is not None)
    k = jnp.asarray(k, jnp.int32)
    lo = jnp.full(jnp.sum(bits, **red).shape, -1, jnp.int32)
    hi = jnp.full_like(lo, 0x7F800000)  # +inf: count(bits <= hi) = n >= k

    def halve(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, **red) >= k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, t = jax.lax.fori_loop(0, 31, halve, (lo, hi))  # t: bit pattern of the k-th smallest
    below = bits < t
    tie = bits == t
    need = k - jnp.sum(below, **red)
    if axis is None:
        order = jnp.cumsum(tie.reshape(-1)).reshape(tie.shape)
    else:
        order = jnp.cumsum(tie, axis=axis)
    return below | (tie & (order <= need))


@jax.jit
def _lowest_k_flat(score: jax.Array, k) -> jax.Array:
    return _lowest_k(score, k)


@jax.jit
def _lowest_k_cols(score: jax.Array, k) -> jax.Array:
    return _lowest_k(score, k, axis=0)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _lowest_nm(score: jax.Array, n: int, m: int) -> jax.Array:
    d_in, d_out = score.shape
    g = score.reshape(d_in // m, m, d_out)
    return (_rank(g, 1) < n).reshape(d_in, d_out)


def _magnitude_score(W) -> jax.Array:
    return jnp.abs(W.astype(jnp.float32))


def _wanda_score(W, act_norm) -> jax.Array:
    a = jnp.asarray(act_norm, jnp.float32)
    if a.shape != (W.shape[0],):
        raise LayerIFError(f"act_norm must have one entry per input ({W.shape[0]}), "
                           f"got shape {a.shape}")
    return jnp.abs(W.astype(jnp.float32)) * a[:, None]


def magnitude_mask(W, sparsity: float | None = None, *, nm=None) -> jax.Array:
    """Prune the `round(s * W.size)` smallest |W| of the matrix (or N:M per output)."""
    W = _check_weight(W)
    s = _check_sparsity(sparsity, nm)
    if nm is not None:
        n, m = _check_nm(nm, W.shape[0])
        return _lowest_nm(_magnitude_score(W), n, m)
    return _lowest_k_flat(_magnitude_score(W), int(round(s * W.size)))


def wanda_mask(W, act_norm, sparsity: float | None = None, *, nm=None) -> jax.Array:
    """Wanda: score |W_ij| * ||X_i||_2; prune the `round(s * d_in)` lowest of each output."""
    W = _check_weight(W)
    s = _check_sparsity(sparsity, nm)
    score = _wanda_score(W, act_norm)
    if nm is not None:
        n, m = _check_nm(nm, W.shape[0])
        return _lowest_nm(score, n, m)
    return _lowest_k_cols(score, int(round(s * W.shape[0])))


# ---------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------
def _sparsegpt_counts(d_in: int, d_out: int, sparsity: float, blocksize: int) -> int:
    """Number of weights SparseGPT's unstructured mask prunes (sum of per-block rounds)."""
    total = 0
    blocksize = min(blocksize, d_in)
    for i1 in range(0, d_in, blocksize):
        total += int(np.round(np.float32(sparsity) * np.float32(d_out * min(blocksize, d_in - i1))))
    return total


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def _sparsegpt_core(W_io, H, sparsity, percdamp, *, blocksize: int, nm):
    """SparseGPT on a [d_in, d_out] kernel; works on W^T (torch layout: columns = inputs)."""
    W = W_io.T.astype(jnp.float32)                   # [rows = d_out, cols = d_in]
    H = H.astype(jnp.float32)
    rows, cols = W.shape
    dg = jnp.diagonal(H)
    dead = dg == 0
    H = H + jnp.diag(dead.astype(H.dtype))           # H[dead, dead] = 1
    W = jnp.where(dead[None, :], 0.0, W)
    H = H + percdamp * jnp.mean(jnp.diagonal(H)) * jnp.eye(cols, dtype=H.dtype)
    Lc = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((Lc, True), jnp.eye(cols, dtype=H.dtype))
    U = jnp.linalg.cholesky(Hinv).T                  # upper: H^-1 = U^T U

    bs = blocksize
    nb = -(-cols // bs)
    C = nb * bs
    pad = C - cols
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        U = jax.scipy.linalg.block_diag(U, jnp.eye(pad, dtype=U.dtype))
    valid = jnp.arange(C) < cols

    def block(b, carry):
        W, Mk = carry
        i1 = b * bs
        W1 = jax.lax.dynamic_slice(W, (0, i1), (rows, bs))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (bs, bs))
        Urow = jax.lax.dynamic_slice(U, (i1, 0), (bs, C))
        v1 = jax.lax.dynamic_slice(valid, (i1,), (bs,))
        d1 = jnp.diagonal(U1)
        if nm is None:
            score = jnp.where(v1[None, :], W1 ** 2 / (d1[None, :] ** 2), jnp.inf)
            n_b = (rows * jnp.sum(v1)).astype(jnp.float32)
            k = jnp.round(sparsity * n_b).astype(jnp.int32)
            mask1 = _lowest_k(score, k)
        else:
            mask1 = jnp.zeros((rows, bs), bool)

        def column(i, c):
            W1, mask1, Err1 = c
            if nm is not None:
                n, m = nm
                g = jax.lax.dynamic_slice(W1, (0, i), (rows, m)) ** 2 \
                    / jax.lax.dynamic_slice(d1, (i,), (m,))[None, :] ** 2
                upd = jax.lax.dynamic_update_slice(mask1, _rank(g, 1) < n, (0, i))
                mask1 = jnp.where(i % m == 0, upd, mask1)
            w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
            pr = jax.lax.dynamic_index_in_dim(mask1, i, axis=1, keepdims=False)
            q = jnp.where(pr, 0.0, w)
            err = (w - q) / U1[i, i]
            # U1[i, :i] = 0: earlier columns are untouched, column i becomes q exactly
            W1 = W1 - err[:, None] * U1[i][None, :]
            W1 = jax.lax.dynamic_update_index_in_dim(W1, q, i, axis=1)
            Err1 = jax.lax.dynamic_update_index_in_dim(Err1, err, i, axis=1)
            return W1, mask1, Err1

        W1, mask1, Err1 = jax.lax.fori_loop(
            0, bs, column, (W1, mask1, jnp.zeros((rows, bs), jnp.float32)))
        # lazy batch update of the later columns (U upper: columns < i1 get zero)
        W = W - jnp.matmul(Err1, Urow, precision=_HI)
        W = jax.lax.dynamic_update_slice(W, W1, (0, i1))
        Mk = jax.lax.dynamic_update_slice(Mk, mask1, (0, i1))
        return W, Mk

    W, Mk = jax.lax.fori_loop(0, nb, block, (W, jnp.zeros((rows, C), bool)))
    W = jnp.where(Mk, 0.0, W)[:, :cols].T.astype(W_io.dtype)
    Mk = Mk[:, :cols].T
    return W, Mk, jnp.sum(Mk), jnp.sum(W == 0), jnp.all(jnp.isfinite(W))


def sparsegpt_prune(W, H, sparsity: float | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, *, nm=None) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh 2023) on a kernel W [d_in, d_out].

    H = 2 X^T X / N [d_in, d_in] from the layer's calibration inputs X [N, d_in].
    Dead inputs (H_ii = 0) are zeroed; H += percdamp * mean(diag H) * I; U = upper
    Cholesky factor of H^-1. Inputs are processed in blocks of `blocksize`: within a
    block the mask is chosen by w^2 / U_ii^2 (`round(s * d_out * width)` lowest of the
    block, or N:M per output decided when the group's first input is reached), each
    input column is pruned in turn and its error spread over the block's later columns
    (lax.fori_loop); the later blocks get one lazy batch update.

    Returns (pruned W, mask True where pruned).
    """
    W = _check_weight(W)
    s = _check_sparsity(sparsity, nm)
    H = jnp.asarray(H)
    if H.shape != (W.shape[0], W.shape[0]):
        raise LayerIFError(f"H must be [{W.shape[0]}, {W.shape[0]}] for a weight with "
                           f"{W.shape[0]} inputs, got {H.shape}")
    if int(blocksize) < 1:
        raise LayerIFError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp >= 0:
        raise LayerIFError(f"percdamp must be >= 0, got {percdamp}")
    nmt = None
    if nm is not None:
        nmt = _check_nm(nm, W.shape[0])
        if blocksize % nmt[1]:
            raise LayerIFError(f"blocksize {blocksize} is not a multiple of M={nmt[1]}")
    bs = min(int(blocksize), W.shape[0])  # one block when the matrix is narrower
    Wp, mask, _, _, finite = _sparsegpt_core(W, H, jnp.float32(s if s is not None else 0.0),
                                             jnp.float32(percdamp), blocksize=bs, nm=nmt)
    if not bool(finite):
        raise LayerIFError("SparseGPT produced non-finite weights (H is not positive "
                           "definite: raise percdamp or use more calibration data)")
    return Wp, mask


# ---------------------------------------------------------------------------------
# block-by-block calibration
# ---------------------------------------------------------------------------------
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
                st["xtx"] = jnp.matmul(hf.T, hf, precision=_HI)
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


@jax.jit
def _count_zeros(W):
    return jnp.sum(W == 0)


@functools.partial(jax.jit, static_argnames=("nm",))
def _apply_magnitude(W, k, *, nm):
    """(pruned W, number masked, number of zeros) in one compiled call."""
    score = _magnitude_score(W)
    if nm is not None:
        mask = _lowest_nm(score, *nm)
    else:
        mask = _lowest_k_flat(score, k)
    Wn = jnp.where(mask, jnp.zeros((), W.dtype), W)
    return Wn, jnp.sum(mask), jnp.sum(Wn == 0)


@functools.partial(jax.jit, static_argnames=("nm",))
def _apply_wanda(W, sq, k, *, nm):
    score = jnp.abs(W.astype(jnp.float32)) * jnp.sqrt(sq)[:, None]
    if nm is not None:
        mask = _lowest_nm(score, *nm)
    else:
        mask = _lowest_k_cols(score, k)
    Wn = jnp.where(mask, jnp.zeros((), W.dtype), W)
    return Wn, jnp.sum(mask), jnp.sum(Wn == 0)


# ---------------------------------------------------------------------------------
# prune_model
# ---------------------------------------------------------------------------------
def prune_model(model, sparsities: Sequence[float] | None, method: str, calib_ids=None, *,
                nm=None, batch_size: int = 8, blocksize: int = 128, percdamp: float = 0.01,
                progress: bool = False):
    """Prune every linear map of `model` in place.

    sparsities: one per matrix in model order (7 * L; 0 leaves a matrix dense), or
    None with `nm`. calib_ids: int [N, T] calibration token windows (not needed for
    magnitude). Returns (model, report) with report {"layers.l.name": achieved
    sparsity} (fraction of exact zeros in the pruned kernel).
    """
    if method not in METHODS:
        raise LayerIFError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    _no_lora(model)
    cfg = model.cfg
    L = cfg.num_layers
    nmt = None
    if nm is not None:
        nmt = _check_nm(nm)
        for name in LINEARS:
            _check_nm(nmt, cfg.linear_shape(name)[0], what=name)
        if method == "sparsegpt" and blocksize % nmt[1]:
            raise LayerIFError(f"blocksize {blocksize} is not a multiple of M={nmt[1]}")
    if sparsities is None:
        if nmt is None:
            raise LayerIFError("sparsities are required (or give nm=(N, M))")
        s_all = np.full(7 * L, nmt[0] / nmt[1])
    else:
        s_all = np.asarray(sparsities, np.float64).reshape(-1)
        if s_all.size != 7 * L:
            raise LayerIFError(f"expected {7 * L} sparsities (7 per block x {L} blocks), "
                               f"got {s_all.size}")
        if not np.all(np.isfinite(s_all)) or (s_all < 0).any() or (s_all >= 1).any():
            raise LayerIFError("every sparsity must be in [0, 1)")
        if nmt is not None and np.abs(s_all - nmt[0] / nmt[1]).max() > 1e-9:
            raise LayerIFError(f"{nmt[0]}:{nmt[1]} pruning fixes every sparsity at "
                               f"{nmt[0] / nmt[1]:g}: use the uniform allocation")

    names = model.cfg.matrix_names()
    report: dict[str, float] = {}
    new_kernels: dict[str, list] = {n: [] for n in LINEARS}

    def prune_block(l, p, stats, n_tok):
        p = dict(p)
        for j, name in enumerate(LINEARS):
            W = p[name]["kernel"]
            s = float(s_all[7 * l + j])
            d_in, d_out = W.shape
            if s == 0.0:
                Wn, expect, got, zeros = W, 0, 0, int(_count_zeros(W))
            else:
                if method == "magnitude":
                    k = (W.size * nmt[0] // nmt[1]) if nmt else int(round(s * W.size))
                    Wn, got, zeros = _apply_magnitude(W, k, nm=nmt)
                    expect = k
                elif method == "wanda":
                    k = None if nmt else int(round(s * d_in))
                    Wn, got, zeros = _apply_wanda(W, stats[INPUT_OF[name]]["sq"],
                                                  0 if k is None else k, nm=nmt)
                    expect = (W.size * nmt[0] // nmt[1]) if nmt else k * d_out
                else:
                    Wn, _, got, zeros, finite = _sparsegpt_core(
                        W, 2.0 * stats[INPUT_OF[name]]["xtx"] / n_tok,
                        jnp.float32(0.0 if nmt else s), jnp.float32(percdamp),
                        blocksize=min(blocksize, d_in), nm=nmt)
                    if not bool(finite):
                        raise LayerIFError(f"{names[7 * l + j]}: SparseGPT produced non-finite "
                                           "weights (raise percdamp or add calibration data)")
                    expect = (W.size * nmt[0] // nmt[1]) if nmt else \
                        _sparsegpt_counts(d_in, d_out, s, blocksize)
                got, zeros = int(got), int(zeros)
                if got != expect:
                    raise RuntimeError(f"{names[7 * l + j]}: mask prunes {got} weights, "
                                       f"expected {expect}")
            if zeros < expect:
                raise RuntimeError(f"{names[7 * l + j]}: only {zeros} zeros after pruning, "
                                   f"expected at least {expect}")
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


# ---------------------------------------------------------------------------------
# OWL outlier ratios, AlphaPruning alphas
# ---------------------------------------------------------------------------------
def outlier_ratios(model, calib_ids, M: float = 5.0, *, batch_size: int = 8,
                   progress: bool = False) -> np.ndarray:
    """OWL's D_l per block: the fraction of Wanda scores |W_ij| * ||X_i||_2 over the
    block's seven matrices (pooled) above M times their mean. Dense model activations."""
    if not M > 0:
        raise LayerIFError(f"M must be > 0, got {M}")
    _no_lora(model)
    out = np.zeros(model.cfg.num_layers)

    def visit(l, p, stats, n_tok):
        scores = [(_wanda_score(p[n]["kernel"], jnp.sqrt(stats[INPUT_OF[n]]["sq"]))).reshape(-1)
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


# ---------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------
def calibration_text(path) -> str:
    """A raw text file as is, or a task JSON/JSONL file: its records' texts joined."""
    from ...data import load_records, read_text, record_text
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        recs = load_records(path)
        return "\n\n".join(record_text(r, index=i, source=str(path))[1]
                           for i, r in enumerate(recs))
    return read_text(path)


def calibration_ids(tokenizer, path, n_seq: int = 128, seq_len: int = 256,
                    seed: int = 0) -> np.ndarray:
    """`n_seq` random windows of `seq_len` tokens from the joined, tokenised text.

    The text of a raw file is tokenised whole; a task file (.json / .jsonl) gives
    its records' texts (`data.record_text`) joined by blank lines. Windows start
    uniformly at random (numpy Generator seeded by `seed`) and may overlap.
    """
    if n_seq < 1 or seq_len < 2:
        raise LayerIFError(f"need n_seq >= 1 and seq_len >= 2, got {n_seq} and {seq_len}")
    ids = np.asarray(encode_text(tokenizer, calibration_text(path)), np.int32)
    if ids.size < seq_len:
        raise LayerIFError(f"{path}: {ids.size} tokens, shorter than one calibration "
                           f"window of {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seq_len + 1, size=n_seq)
    return np.stack([ids[s:s + seq_len] for s in starts])
