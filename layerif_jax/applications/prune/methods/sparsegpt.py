"""SparseGPT: prune with second-order compensation of the remaining weights."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ....errors import LayerIFError
from ..masks import PRECISION, lowest_k, rank, check_nm, check_sparsity, check_weight
from . import PrunerBase, nm_count, register_pruner

__all__ = ["sparsegpt_counts", "sparsegpt_core", "sparsegpt_prune", "SparseGPT"]


def sparsegpt_counts(d_in: int, d_out: int, sparsity: float, blocksize: int) -> int:
    """Number of weights SparseGPT's unstructured mask prunes (sum of per-block rounds)."""
    total = 0
    blocksize = min(blocksize, d_in)
    for i1 in range(0, d_in, blocksize):
        total += int(np.round(np.float32(sparsity) * np.float32(d_out * min(blocksize, d_in - i1))))
    return total


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def sparsegpt_core(W_io, H, sparsity, percdamp, *, blocksize: int, nm):
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
            mask1 = lowest_k(score, k)
        else:
            mask1 = jnp.zeros((rows, bs), bool)

        def column(i, c):
            W1, mask1, Err1 = c
            if nm is not None:
                n, m = nm
                g = jax.lax.dynamic_slice(W1, (0, i), (rows, m)) ** 2 \
                    / jax.lax.dynamic_slice(d1, (i,), (m,))[None, :] ** 2
                upd = jax.lax.dynamic_update_slice(mask1, rank(g, 1) < n, (0, i))
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
        W = W - jnp.matmul(Err1, Urow, precision=PRECISION)
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
    W = check_weight(W)
    s = check_sparsity(sparsity, nm)
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
        nmt = check_nm(nm, W.shape[0])
        if blocksize % nmt[1]:
            raise LayerIFError(f"blocksize {blocksize} is not a multiple of M={nmt[1]}")
    bs = min(int(blocksize), W.shape[0])  # one block when the matrix is narrower
    Wp, mask, _, _, finite = sparsegpt_core(W, H, jnp.float32(s if s is not None else 0.0),
                                             jnp.float32(percdamp), blocksize=bs, nm=nmt)
    if not bool(finite):
        raise LayerIFError("SparseGPT produced non-finite weights (H is not positive "
                           "definite: raise percdamp or use more calibration data)")
    return Wp, mask


@register_pruner
@dataclasses.dataclass(frozen=True)
class SparseGPT(PrunerBase):
    name = "sparsegpt"
    calibration = "xtx"
    default_epsilon = 0.1
    blocksize: int = 128          # inputs per block (lazy batch updates between blocks)
    percdamp: float = 0.01        # damping, a fraction of the mean diagonal of H

    def check(self, nm) -> None:
        if int(self.blocksize) < 1:
            raise LayerIFError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise LayerIFError(f"percdamp must be >= 0, got {self.percdamp}")
        if nm is not None and self.blocksize % nm[1]:
            raise LayerIFError(f"blocksize {self.blocksize} is not a multiple of M={nm[1]}")

    def prune(self, W, sparsity, nm, stats, n_tok):
        d_in, d_out = W.shape
        Wn, _, got, zeros, finite = sparsegpt_core(
            W, 2.0 * stats["xtx"] / n_tok, jnp.float32(0.0 if nm else sparsity),
            jnp.float32(self.percdamp), blocksize=min(self.blocksize, d_in), nm=nm)
        if not bool(finite):
            raise LayerIFError("SparseGPT produced non-finite weights (raise percdamp or add "
                               "calibration data)")
        expect = nm_count(W, nm) if nm else sparsegpt_counts(d_in, d_out, sparsity,
                                                             self.blocksize)
        return Wn, got, zeros, expect
