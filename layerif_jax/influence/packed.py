"""Per-example LoRA gradients from ONE batched backward over packed rows.

Why: `vmap(grad)` needs every example of a chunk padded to one length, and every
distinct length is another compilation. Here several examples share a row
(attention stays inside an example, positions restart), so rows are nearly full,
there is a single compiled shape, and the backward is an ordinary batched one.

How: a LoRA map y = x W + s (x A) B has, for example e with tokens t in e,

    dL_e/dB = s * sum_{t in e} u_t^T dy_t          u = x A
    dL_e/dA = s * sum_{t in e} x_t^T (dy_t B^T)

so per-example gradients need only the inputs x_t, u_t (recorded in the forward)
and dy_t = dL/dy_t, obtained as the gradient with respect to a zero "tap" added to
every LoRA map's output. Examples in a row do not interact, so the gradient of
the sum of per-example losses gives each token exactly its own example's dy_t.
The segment sums are one matmul per module against a one-hot [E, tokens] matrix,
for all layers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data import Example
from ..errors import LayerIFError
from ..model.decoder import INPUT_OF, rms_norm
from .core import precision


@dataclasses.dataclass(frozen=True)
class PackedChunk:
    ids: np.ndarray        # int32 [R, T]
    segments: np.ndarray   # int32 [R, T]: example number within its row (0..J-1), -1 = padding
    positions: np.ndarray  # int32 [R, T]: restart at 0 for every example
    targets: np.ndarray    # bool  [R, T]
    slot_pos: np.ndarray   # int32 [E]: r * J + j of each slot, R * J for an empty slot
    index: np.ndarray      # int32 [E]: input index of each slot, -1 = empty slot


def pack_chunks(examples: Sequence[Example], *, rows: int, row_len: int, slots: int,
                per_row: int) -> list[PackedChunk]:
    """First-fit-decreasing packing into chunks of `rows` rows of `row_len` tokens, at
    most `slots` examples per chunk and `per_row` per row. Every chunk has the same shapes."""
    lengths = np.array([len(e.ids) for e in examples])
    if lengths.max() > row_len:
        raise LayerIFError(f"an example has {lengths.max()} tokens, more than the packed row "
                           f"length {row_len}")
    order = np.argsort(-lengths, kind="stable")
    chunks: list[list[list[int]]] = []   # chunk -> row -> example indices
    free: list[list[int]] = []           # chunk -> free tokens per row
    count: list[int] = []
    for i in order:
        t = lengths[i]
        placed = False
        for c in range(len(chunks)):
            if count[c] >= slots:
                continue
            for r in range(rows):
                if free[c][r] >= t and len(chunks[c][r]) < per_row:
                    chunks[c][r].append(int(i))
                    free[c][r] -= t
                    count[c] += 1
                    placed = True
                    break
            if placed:
                break
        if not placed:
            chunks.append([[int(i)]] + [[] for _ in range(rows - 1)])
            free.append([row_len - t] + [row_len] * (rows - 1))
            count.append(1)
    out = []
    for rows_ in chunks:
        c = empty_chunk(rows, row_len, slots, per_row)
        slot = 0
        for r, members in enumerate(rows_):
            off = 0
            for j, i in enumerate(members):
                ex = examples[i]
                t = len(ex.ids)
                c.ids[r, off:off + t] = ex.ids
                c.segments[r, off:off + t] = j
                c.positions[r, off:off + t] = np.arange(t)
                c.targets[r, off:off + t] = ex.targets
                c.slot_pos[slot] = r * per_row + j
                c.index[slot] = i
                slot += 1
                off += t
        out.append(c)
    return out


def empty_chunk(rows: int, row_len: int, slots: int, per_row: int) -> PackedChunk:
    """A chunk with no example (also pads the chunk count to a multiple of the devices)."""
    return PackedChunk(np.zeros((rows, row_len), np.int32), np.full((rows, row_len), -1, np.int32),
                       np.zeros((rows, row_len), np.int32), np.zeros((rows, row_len), bool),
                       np.full((slots,), rows * per_row, np.int32), np.full((slots,), -1, np.int32))


def token_nll(model, x_BTD: jax.Array, ids_BT: jax.Array) -> jax.Array:
    """-log p(ids[t+1] | ids[<=t]) at every position t -> [B, T] (float32; the last
    position has no next token and gets a dummy target: weight it 0).

    logsumexp minus the target logit; the target logit is a row gather of the output
    matrix (its backward is a dense product, not a scatter into [B, T, V]), and the
    logits are never sliced (a copy of [B, T, V]).
    """
    nxt = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, :1]], axis=1)
    lse = jax.nn.logsumexp(model.head(x_BTD).astype(jnp.float32), axis=-1)
    h = rms_norm(x_BTD, model.norm[...], model.cfg.rms_norm_eps, model.cfg.norm_offset)
    w = model.embed_tokens[...] if model.lm_head is None else model.lm_head[...].T
    tgt = jnp.einsum("btd,btd->bt", h.astype(jnp.float32),
                     jnp.take(w, nxt, axis=0).astype(jnp.float32))
    return lse - tgt


def zero_taps(model, rows: int, row_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """The zero taps {module: [L, R, T, d_out]}: made once and passed in, since a
    broadcast of zeros inside the jitted function costs a full write every call."""
    lin = model.layers.linears()
    return {name: jnp.zeros((model.cfg.num_layers, rows, row_len, lin[name].kernel.shape[-1]),
                            dtype) for name in model.layers.lora_settings()}


def packed_grad_fn(graphdef, *, slots: int, per_row: int, dtype=None):
    """(lora, rest, ids, segments, positions, targets, slot_pos, taps)
    -> (grads [E, L, ...] like lora, finite_E).

    Pure and jit-able; one forward and one batched backward per chunk. `taps` are
    zeros from `zero_taps`. The segment sums run per row (one-hot [R, J, T], J
    examples at most per row), then a gather puts them into the E slots.
    """

    def fn(lora, rest, ids_RT, seg_RT, pos_RT, tgt_RT, slot_pos_E, taps):
        model = nnx.merge(graphdef, lora, rest)
        lin = model.layers.linears()
        settings = model.layers.lora_settings()
        R, T = ids_RT.shape
        oh_RJT = (seg_RT[:, None, :] == jnp.arange(per_row)[None, :, None]).astype(jnp.float32)
        # position t predicts token t+1: weight it by targets[t+1] / (targets of its example)
        tgt = jnp.concatenate([tgt_RT[:, 1:], jnp.zeros_like(tgt_RT[:, :1])], 1).astype(jnp.float32)
        n_tok_RJ = jnp.einsum("rjt,rt->rj", oh_RJT, tgt)
        w_RT = jnp.einsum("rjt,rj->rt", oh_RJT, 1.0 / jnp.maximum(n_tok_RJ, 1.0)) * tgt

        def loss(taps):
            x, rec = model.hidden_states(ids_RT, seg_RT >= 0, positions_BT=pos_RT,
                                         segments_BT=seg_RT, dtype=dtype, taps=taps)
            return jnp.sum(token_nll(model, x, ids_RT) * w_RT), rec

        dy, rec = jax.grad(loss, has_aux=True)(taps)

        def to_slots(g_LRJ):  # [L, R, J, ...] -> [E, L, ...] (empty slots: zeros)
            flat = g_LRJ.reshape(g_LRJ.shape[0], R * per_row, *g_LRJ.shape[3:])
            flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], 1)
            return jnp.moveaxis(jnp.take(flat, slot_pos_E, axis=1), 1, 0)

        grads = {}
        for name, (scale, _) in settings.items():
            x_in = rec[INPUT_OF[name]].astype(jnp.float32)    # [L, R, T, I]
            A_LIK = lin[name].lora_a[...].astype(jnp.float32)
            B_LKO = lin[name].lora_b[...].astype(jnp.float32)
            d_y = dy[name].astype(jnp.float32)                 # [L, R, T, O]
            u = jnp.einsum("lrti,lik->lrtk", x_in, A_LIK, precision=precision())
            d_u = scale * jnp.einsum("lrto,lko->lrtk", d_y, B_LKO, precision=precision())
            # per example: sum over its tokens of x^T d_u and u^T d_y (masks on the skinny side)
            gA = jnp.einsum("lrjtk,lrti->lrjik", oh_RJT[None, ..., None] * d_u[:, :, None],
                            x_in, precision=precision())
            gB = scale * jnp.einsum("lrjtk,lrto->lrjko", oh_RJT[None, ..., None] * u[:, :, None],
                                    d_y, precision=precision())
            grads[name] = (to_slots(gA), to_slots(gB))

        def pick(path, leaf):
            keys = [str(getattr(k, "key", k)) for k in path]
            name = next(k for k in keys if k in grads)
            return grads[name][0 if "lora_a" in keys else 1]

        out = jax.tree_util.tree_map_with_path(pick, lora)
        leaves = jax.tree.leaves(out)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g.reshape(slots, -1)), axis=1)
                                    for g in leaves]), axis=0)
        return out, finite

    return fn


def plan(lengths: Sequence[int], *, chunk_size: int, row_len: int | None = None):
    """(rows, row_len, slots, per_row) for about `chunk_size` examples a chunk.

    Rows are twice the longest example by default (room for ~2-3 typical ones);
    slots leave 25% headroom over the mean fill, so rows, not slots, run out first;
    per_row bounds the examples one row may hold.
    """
    lengths = np.asarray(lengths)
    max_len = int(lengths.max())
    mean = float(lengths.mean())
    row_len = int(row_len or max(max_len, 2 * max_len if max_len <= 256 else max_len))
    if row_len < max_len:
        raise LayerIFError(f"row length {row_len} is shorter than the longest example ({max_len})")
    fill = row_len / mean
    rows = max(1, int(np.ceil(chunk_size / fill)))
    slots = max(1, int(np.ceil(rows * fill * 1.25)))
    per_row = int(min(slots, row_len // max(1, int(np.percentile(lengths, 10)))))
    return rows, row_len, slots, max(1, per_row)
