"""Per-example LoRA gradients from ONE batched backward over packed rows.

Why: `vmap(grad)` needs every example of a chunk padded to one length, and every
distinct length is another compilation. Here several examples share a row
(attention stays inside an example, positions restart), so rows are nearly full,
there is a single compiled shape, and the backward is an ordinary batched one.

How: a LoRA map y = x W + s (x A) B has, for example e with tokens t in e,

    dL_e/dB = s * sum_{t in e} u_t^T dy_t          u = x A
    dL_e/dA = s * sum_{t in e} x_t^T (dy_t B^T)

so per-example gradients need only the inputs x_t and dy_t = dL/dy_t. Examples in
a row do not interact, so the backward of the sum of per-example losses gives each
token exactly its own example's dy_t. The sums run inside the backward of each
layer, as the cotangent of zero "probes" that stand for per-example offsets of the
LoRA factors (`decoder.probed_linears`): x and dy are used while they are in cache
and never stacked over layers, and the LoRA maps sharing an input (q, k, v; gate,
up) run as one GEMM with the LoRA folded into the kernel.
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
from ..model.decoder import rms_norm


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


def zero_probes(model, rows: int, per_row: int, dtype=jnp.float32) -> dict[str, tuple]:
    """The zero probes {LoRA module: (pA [L, R*J, I, r], pB [L, R*J, r, O])}, one pair
    per example position (row, j) of a chunk: made once and passed in, since a
    broadcast of zeros inside the jitted function costs a full write every call."""
    L = model.cfg.num_layers
    out = {}
    for name, lin in model.layers.linears().items():
        if lin.lora_a is None:
            continue
        _, d_in, r = lin.lora_a.shape
        d_out = lin.lora_b.shape[-1]
        out[name] = (jnp.zeros((L, rows * per_row, d_in, r), dtype),
                     jnp.zeros((L, rows * per_row, r, d_out), dtype))
    return out


def packed_grad_fn(graphdef, *, slots: int, per_row: int, dtype=None):
    """(lora, rest, ids, segments, positions, targets, slot_pos, probes)
    -> (grads [E, L, ...] like lora, finite_E).

    Pure and jit-able; one forward and one batched backward per chunk. `probes` are
    zeros from `zero_probes`; their gradient is the per-example LoRA gradient of
    every example position (row, j), computed inside the backward of each layer
    (`decoder.probed_linears`), so no [L, tokens, d] cotangent is ever stacked. A
    gather then puts the R*J positions into the E slots.
    """

    def fn(lora, rest, ids_RT, seg_RT, pos_RT, tgt_RT, slot_pos_E, probes):
        model = nnx.merge(graphdef, lora, rest)
        R, T = ids_RT.shape
        oh_RJT = (seg_RT[:, None, :] == jnp.arange(per_row)[None, :, None]).astype(jnp.float32)
        # position t predicts token t+1: weight it by targets[t+1] / (targets of its example)
        tgt = jnp.concatenate([tgt_RT[:, 1:], jnp.zeros_like(tgt_RT[:, :1])], 1).astype(jnp.float32)
        n_tok_RJ = jnp.einsum("rjt,rt->rj", oh_RJT, tgt)
        w_RT = jnp.einsum("rjt,rj->rt", oh_RJT, 1.0 / jnp.maximum(n_tok_RJ, 1.0)) * tgt

        def loss(probes):
            x = model.hidden_states(ids_RT, seg_RT >= 0, positions_BT=pos_RT,
                                    segments_BT=seg_RT, dtype=dtype, probes=probes,
                                    probe_onehot=oh_RJT)
            return jnp.sum(token_nll(model, x, ids_RT) * w_RT)

        g = jax.grad(loss)(probes)

        def to_slots(g_LP):  # [L, R*J, ...] -> [E, L, ...] (empty slots: zeros)
            g_LP = jnp.concatenate([g_LP, jnp.zeros_like(g_LP[:, :1])], 1)
            return jnp.moveaxis(jnp.take(g_LP, slot_pos_E, axis=1), 1, 0)

        def pick(path, leaf):
            keys = [str(getattr(k, "key", k)) for k in path]
            name = next(k for k in keys if k in g)
            return to_slots(g[name][0 if "lora_a" in keys else 1]).astype(leaf.dtype)

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
