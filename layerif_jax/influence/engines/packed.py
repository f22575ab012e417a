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
LoRA factors (`probed_linears`): x and dy are used while they are in cache and never
stacked over layers, and the LoRA maps sharing an input (q, k, v; gate, up) run as
one GEMM with the LoRA folded into the kernel.

What a model provides to use this engine (`PackedModel`; the project's decoders do):
stacked LoRA on named linear maps (state paths `...<name>.lora_a` / `.lora_b`), a
forward over packed rows that calls a hook for every group of linear maps sharing
an input, and the next-token loss of its hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ...kernels import switch
from ...kernels import segment_grads

from ... import sharding as shd
from ...data import Example
from ...errors import LayerIFError
from ...ops import layer_remat, mm, precision, remat_mode, target_platform
from ..distributed import ExampleShard, data_blocks, gather_host, put
from .general import TRUE_FISHER_SEED, draw_next_tokens, example_key


class PackedModel(Protocol):
    """The interface of a model the packed engine runs on."""

    def packed_lora(self) -> dict[str, tuple[int, int, int, float]]:
        """{linear map: (d_in, rank, d_out, scale)} of its LoRA maps (stacked on L)."""

    def hidden_states(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                      dtype=None, group_fn=None, layer_data=None):
        """Hidden states; for every layer and every group of linear maps that share an
        input h, `group_fn(p, data, names, h) -> tuple of outputs`, where p holds the
        layer's slice of each map's arrays ({"kernel", "lora_a", "lora_b", "bias"?})
        and data the layer's slice of `layer_data` (leaves with a leading layer axis)."""

    def next_token_nll(self, x_BTD, ids_BT) -> jax.Array:
        """-log p(ids[t+1] | ids[<=t]) at every position -> [B, T] float32."""

    def head(self, x_BTD) -> jax.Array:
        """The logits [B, T, V] of the hidden states (the true Fisher draws from them)."""


def supports(model) -> bool:
    return all(hasattr(model, a) for a in ("packed_lora", "hidden_states", "next_token_nll"))


# -- the probed linear maps -------------------------------------------------------------

def fold_lora(kernel, a, b, scale: float, dtype) -> jax.Array:
    w = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    # materialise W + sAB once: fused into the GEMM it would be recomputed per tile
    return jax.lax.optimization_barrier(w).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def probed_linears(x, params, probes, seg_RT, scales: tuple, dtype, per_row: int,
                   mode: str = "grads") -> tuple:
    """The LoRA maps that share the input x [R, T, I] (q, k, v or gate, up), as ONE
    GEMM against the concatenated folded kernels [W_m + s_m A_m B_m]: a tuple of y_m.

    params: ((W, A, B), ...) per map; probes: ((pA [R*J, I, r], pB [R*J, r, O]), ...),
    ZEROS. The probes stand for per-example offsets of each map's LoRA factors
    (A + pA_e, B + pB_e for the tokens of example e = (row, j): those with
    seg_RT == j in row r, j < per_row), so the gradient with respect to them at zero is the
    per-example LoRA gradient, and the backward computes it right there, per layer,
    from x and dy = dL/dy:

        dL_e/dB = s * sum_{t in e} (x_t A)^T dy_t,    dL_e/dA = s * sum_{t in e} x_t^T (dy_t B^T)

    (`kernels.segment_grads`: on a TPU a Pallas kernel, elsewhere its pure-JAX reference).

    The forward ignores the probes' values (it is only differentiated at zero), and
    the cotangents of W, A and B are zeros: the path is differentiable with respect
    to x and the probes only. Saved for the backward: x and the parameter slices
    (which the layer scan forwards without a copy), never dy or a folded matrix.

    mode="both": each map's probes also hold zero K-FAC factors (pA, pB, xx [I, I],
    dudu [r, r], uu [r, r], dydy [O, O]), whose cotangents are the token sums over
    the chunk's example tokens of x x^T, du du^T (du = s dy B^T, the gradient with
    respect to x A), u u^T (u = x A) and (s dy)(s dy)^T (the gradient with respect to
    the LoRA output): the covariances of K-FAC for A and for B, from the same backward.

    mode="scores": each map's probes are (tA [R*J, M], tB [R*J, M], h_A [M, I, r],
    h_B [M, r, O]), zero scalars per example position and M fixed directions; the
    cotangents of tA and tB are h_A . dL_e/dA and h_B . dL_e/dB (the scores of an
    estimator whose IHVP is h), with no per-example gradient formed (`_score_sums`).
    """
    return _probed_fwd(x, params, probes, seg_RT, scales, dtype, per_row, mode)[0]


def _folded_cat(params, scales, dtype):
    return jnp.concatenate([fold_lora(k, a, b, s, dtype) for (k, a, b), s in zip(params, scales)], 1)


def _probed_fwd(x, params, probes, seg_RT, scales, dtype, per_row, mode="grads"):
    y = mm(x, _folded_cat(params, scales, dtype))
    sizes = [k.shape[-1] for k, _, _ in params]
    ys = tuple(jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1))
    # the score directions h are read by the backward ("scores"); probes of the other
    # modes are zeros whose values nothing reads
    return ys, (x, params, seg_RT, probes if mode == "scores" else None)


def _probed_bwd(scales, dtype, per_row, mode, res, dys):
    x, params, seg, probes = res
    dx = mm(jnp.concatenate([dy.astype(dtype) for dy in dys], -1),
            _folded_cat(params, scales, dtype).T)
    prec = precision()
    RJ = seg.shape[0] * per_row
    zeros = jax.tree.map(jnp.zeros_like, params)
    if mode == "scores":
        return dx, zeros, _score_sums(x, params, scales, dys, seg, probes, per_row, prec), \
            np.zeros(seg.shape, jax.dtypes.float0)
    g_probes = []
    for (_, a, b), s, dy in zip(params, scales, dys):
        # under a sharded preset (activation rules on) the reference: XLA cannot partition
        # the Pallas call (vmapped over the data shards every device would gather all rows)
        gA, gB = segment_grads.lora_grads(
            x, dy, seg, a, b, s, per_row, platform=target_platform(), precision=prec,
            impl="reference" if shd.active_rules() is not None else None)
        g_probes.append((gA.reshape(RJ, *gA.shape[2:]), gB.reshape(RJ, *gB.shape[2:])))
    if mode == "both":
        g_probes = [g + f for g, f in zip(g_probes, _factor_sums(
            x.astype(jnp.float32), params, scales, dys, seg, prec))]
    return dx, zeros, tuple(g_probes), np.zeros(seg.shape, jax.dtypes.float0)


def _score_sums(x, params, scales, dys, seg, probes, per_row, prec) -> tuple:
    """mode "scores": each map's probes are (tA [R*J, M], tB [R*J, M], h_A [M, I, r],
    h_B [M, r, O]); the cotangents of tA and tB are h_A . dA_e and h_B . dB_e of every
    example position (`kernels.segment_grads.lora_scores`: no per-example gradient is
    formed), those of the directions zeros."""
    out = []
    for (_, a, b), s, dy, (ta, tb, ha, hb) in zip(params, scales, dys, probes):
        sa, sb = segment_grads.lora_scores(x, dy, seg, a, b, ha, hb, s, per_row,
                                           precision=prec)
        out.append((sa.reshape(ta.shape), sb.reshape(tb.shape), jnp.zeros_like(ha),
                    jnp.zeros_like(hb)))
    return tuple(out)


def _factor_sums(xf, params, scales, dys, seg, prec) -> tuple:
    """Token sums of the K-FAC covariances of every map of a group (see probed_linears);
    padding tokens are masked out, and x x^T is formed once for the maps sharing x. Each
    sum is one 2-D GEMM over the chunk's tokens."""
    mask = (seg >= 0).astype(jnp.float32).reshape(-1, 1)              # [R*T, 1]
    flat = lambda z: z.reshape(-1, z.shape[-1])                        # noqa: E731
    gram = lambda a, b: jnp.matmul(a.T, b, precision=prec)             # noqa: E731
    x2 = flat(xf)
    xx = gram(x2 * mask, x2)
    out = []
    for (_, a, b), s, dy in zip(params, scales, dys):
        sdy = s * flat(dy).astype(jnp.float32) * mask
        u = jnp.matmul(x2, a.astype(jnp.float32), precision=prec)
        du = jnp.matmul(sdy, b.astype(jnp.float32).T, precision=prec)
        out.append((xx, gram(du, du), gram(u * mask, u), gram(sdy, sdy)))
    return tuple(out)


probed_linears.defvjp(_probed_fwd, _probed_bwd)


def probe_group_fn(scales: dict[str, float], seg_RT, per_row: int, dtype,
                   mode: str = "grads"):
    """The `group_fn` hook: the LoRA maps of a group as one probed GEMM; maps without
    LoRA as plain GEMMs. `data` is the layer's probes {name: (pA, pB)}, with mode
    "both" followed by its zero K-FAC factors."""
    def fn(p, probes, names, h):
        lora = [n for n in names if n in probes]
        ys = dict(zip(lora, probed_linears(
            h, tuple((p[n]["kernel"], p[n]["lora_a"], p[n]["lora_b"]) for n in lora),
            tuple(probes[n] for n in lora), seg_RT, tuple(scales[n] for n in lora),
            dtype, per_row, mode))) if lora else {}
        out = []
        for n in names:
            y = ys[n] if n in ys else mm(h, p[n]["kernel"].astype(dtype))
            out.append(y + p[n]["bias"].astype(y.dtype) if "bias" in p[n] else y)
        return tuple(out)
    return fn


# -- packing -----------------------------------------------------------------------------

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
    return [_fill(examples, rows_, rows, row_len, slots, per_row) for rows_ in chunks]


def _fill(examples, members_of_rows, rows, row_len, slots, per_row) -> PackedChunk:
    c = empty_chunk(rows, row_len, slots, per_row)
    slot = 0
    for r, members in enumerate(members_of_rows):
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
    return c


def empty_chunk(rows: int, row_len: int, slots: int, per_row: int) -> PackedChunk:
    """A chunk with no example (also pads the chunk count to a multiple of the devices)."""
    return PackedChunk(np.zeros((rows, row_len), np.int32), np.full((rows, row_len), -1, np.int32),
                       np.zeros((rows, row_len), np.int32), np.zeros((rows, row_len), bool),
                       np.full((slots,), rows * per_row, np.int32), np.full((slots,), -1, np.int32))


def plan(lengths: Sequence[int], *, chunk_size: int, row_len: int | None = None):
    """(rows, row_len, slots, per_row) for about `chunk_size` examples a chunk.

    Rows are twice the longest example by default (room for ~2-3 typical ones);
    slots leave 25% headroom over the mean fill, so rows, not slots, run out first, but
    never more than a chunk can hold (rows x per_row: no slot that is always empty, e.g.
    16 slots, not 20, for 16 examples of one length); per_row bounds the examples one row
    may hold.
    """
    lengths = np.asarray(lengths)
    max_len = int(lengths.max())
    mean = float(lengths.mean())
    row_len = int(row_len or max(max_len, 2 * max_len if max_len <= 256 else max_len))
    if row_len < max_len:
        raise LayerIFError(f"row length {row_len} is shorter than the longest example ({max_len})")
    fill = row_len / mean
    rows = max(1, int(np.ceil(chunk_size / fill)))
    per_row = max(1, row_len // max(1, int(np.percentile(lengths, 10))))
    slots = max(1, min(int(np.ceil(rows * fill * 1.25)), rows * per_row))
    return rows, row_len, slots, min(per_row, slots)


def _lengths(examples) -> np.ndarray:
    """Token counts of an example set (of an `ExampleShard`: its whole set's, gathered)."""
    if isinstance(examples, ExampleShard):
        return np.concatenate(gather_host(np.array([len(e.ids) for e in examples.examples],
                                                   np.int64)))
    return np.array([len(e.ids) for e in examples], np.int64)


# -- the gradient function ----------------------------------------------------------------

def zero_probes(model, rows: int, per_row: int, dtype=jnp.float32) -> dict[str, tuple]:
    """The zero probes {LoRA map: (pA [L, R*J, I, r], pB [L, R*J, r, O])}, one pair per
    example position (row, j) of a chunk. Made inside the jitted function: the forward
    never reads their values, so XLA drops them and only their cotangents exist (no
    device holds [L, R*J, I, r] zeros; measured on CPU, no slower than passing them in)."""
    L = model.cfg.num_layers
    return {name: (jnp.zeros((L, rows * per_row, d_in, r), dtype),
                   jnp.zeros((L, rows * per_row, r, d_out), dtype))
            for name, (d_in, r, d_out, _) in model.packed_lora().items()}


def chunk_weights(seg_RT, tgt_RT, per_row: int) -> tuple[jax.Array, jax.Array]:
    """(onehot [R, J, T] of each token's example, loss weight w [R, T]): position t
    predicts token t+1 and weighs targets[t+1] / (the target tokens of its example), so
    sum(nll * w) is the sum over the chunk's examples of each one's mean loss."""
    oh_RJT = (seg_RT[:, None, :] == jnp.arange(per_row)[None, :, None]).astype(jnp.float32)
    tgt = jnp.concatenate([tgt_RT[:, 1:], jnp.zeros_like(tgt_RT[:, :1])], 1).astype(jnp.float32)
    n_tok_RJ = jnp.einsum("rjt,rt->rj", oh_RJT, tgt)
    return oh_RJT, jnp.einsum("rjt,rj->rt", oh_RJT, 1.0 / jnp.maximum(n_tok_RJ, 1.0)) * tgt


def _chunk_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row: int, dtype, mode: str,
                draw=None):
    """probes -> the sum over the chunk's examples of each example's mean next-token
    loss, with every LoRA group probed (`probe_group_fn`, in `mode`)."""
    scales = {n: s for n, (*_, s) in model.packed_lora().items()}
    group_fn = probe_group_fn(scales, seg_RT, per_row, dtype or model.dtype, mode)
    return packed_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row, dtype, group_fn, draw)


def packed_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row: int, dtype, group_fn,
                draw=None):
    """probes -> the sum over the chunk's examples of each example's mean next-token
    loss, every group of linear maps run by `group_fn` with the layer's probes. With
    `draw` ((seed, examples [R, T]): the true Fisher) the label of every position is
    not the next id but a token drawn from the model's own prediction there
    (`general.draw_next_tokens`, per example and position)."""
    _, w_RT = chunk_weights(seg_RT, tgt_RT, per_row)

    def loss(probes):
        x = model.hidden_states(ids_RT, seg_RT >= 0, positions_BT=pos_RT, segments_BT=seg_RT,
                                dtype=dtype, group_fn=group_fn, layer_data=probes)
        labels = ids_RT if draw is None else _drawn_labels(model, x, ids_RT, pos_RT, *draw)
        return jnp.sum(model.next_token_nll(x, labels) * w_RT)
    return loss


def _drawn_labels(model, x_RTD, ids_RT, pos_RT, seed: int, ex_RT):
    """ids whose next token at every position t is one drawn from the model's prediction
    at t (`next_token_nll` reads position t's label at t + 1)."""
    logits = model.head(x_RTD)
    R, T, V = logits.shape
    keys = jax.vmap(lambda i: example_key(seed, i))(ex_RT.reshape(-1))
    drawn = draw_next_tokens(keys, pos_RT.reshape(-1), logits.reshape(R * T, V)).reshape(R, T)
    return jnp.concatenate([ids_RT[:, :1], drawn[:, :-1].astype(ids_RT.dtype)], 1)


def packed_grad_fn(graphdef, *, slots: int, per_row: int, dtype=None, factors: bool = False,
                   labels_seed: int | None = None):
    """(lora, rest, ids, segments, positions, targets, slot_pos)
    -> (grads [E, L, ...] like lora, finite_E), and with `factors` also the token sums
    of the K-FAC covariances of every LoRA leaf, [left, right] per leaf in leaf order
    (A: x x^T and du du^T; B: u u^T and dy dy^T, see `probed_linears`). With
    `labels_seed` (the true Fisher) the function takes the tokens' example indices
    [R, T] (`Group.examples`) last, and the labels are drawn from the model
    (`packed_loss`).

    Pure and jit-able; one forward and one batched backward per chunk. The probes are
    zeros (`zero_probes`, made here); their gradient is the per-example LoRA gradient of
    every example position (row, j), computed inside the backward of each layer
    (`probed_linears`), so no [L, tokens, d] cotangent is ever stacked. A gather then
    puts the R*J positions into the E slots.
    """

    def fn(lora, rest, ids_RT, seg_RT, pos_RT, tgt_RT, slot_pos_E, *examples_RT):
        model = nnx.merge(graphdef, lora, rest)
        probes = zero_probes(model, ids_RT.shape[0], per_row)
        if factors:   # made inside: only their cotangents are kept
            zeros = zero_factors(model)
            probes = {k: p + zeros[k] for k, p in probes.items()}
        draw = None if labels_seed is None else (labels_seed, examples_RT[0])
        g = jax.grad(_chunk_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row, dtype,
                                 "both" if factors else "grads", draw))(probes)

        leaves, sums = [], []
        for path, leaf in jax.tree_util.tree_flatten_with_path(lora)[0]:
            name, is_a = _map_of(path, g)
            gm = g[name]
            leaves.append(to_slots(gm[0 if is_a else 1], slot_pos_E).astype(leaf.dtype))
            if factors:
                sums += [gm[2], gm[3]] if is_a else [gm[4], gm[5]]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g.reshape(slots, -1)), axis=1)
                                    for g in leaves]), axis=0)
        return (leaves, finite, sums) if factors else (leaves, finite)

    return fn


def _map_of(path, maps) -> tuple[str, bool]:
    """The LoRA map a leaf of the adapter state belongs to, and whether it is A."""
    keys = [str(getattr(k, "key", k)) for k in path]
    return next(k for k in keys if k in maps), "lora_a" in keys


def to_slots(g_LP, slot_pos_E):
    """[L, R*J, ...] per example position -> [E, L, ...] per slot (empty slots: zeros)."""
    g_LP = jnp.concatenate([g_LP, jnp.zeros_like(g_LP[:, :1])], 1)
    return jnp.moveaxis(jnp.take(g_LP, slot_pos_E, axis=1), 1, 0)


def packed_score_fn(graphdef, *, slots: int, per_row: int, dtype=None):
    """(lora, rest, h, ids, segments, positions, targets, slot_pos) -> (h_m . g_e per
    piece [E, M, P], finite_E): the scores `core.dots(grads, h)` gives, from the same
    forward and backward as `packed_grad_fn` but with no per-example gradient formed
    (`probed_linears` in mode "scores"). h: leaves like the LoRA state with a leading
    axis of M directions (piece form [M, L, ...]); P: the L pieces of each leaf, in leaf
    order. Costs per token and map a GEMM of x against M more rank-r columns and one of
    dy: cheaper than forming gradients while M is small (the mean validation gradient:
    M = 1)."""

    def fn(lora, rest, h, ids_RT, seg_RT, pos_RT, tgt_RT, slot_pos_E):
        model = nnx.merge(graphdef, lora, rest)
        maps = model.packed_lora()
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]]
        leaves = jax.tree.leaves(lora)
        M, RJ = h[0].shape[0], ids_RT.shape[0] * per_row
        dirs: dict[str, list] = {n: [None, None] for n in maps}
        for path, leaf, hk in zip(paths, leaves, h):
            name, is_a = _map_of(path, maps)   # [M, L, ...] -> [L, M, ...] (scanned by layer)
            dirs[name][0 if is_a else 1] = jnp.moveaxis(
                hk.reshape(M, *leaf.shape).astype(jnp.float32), 0, 1)
        L = model.cfg.num_layers
        probes = {n: (jnp.zeros((L, RJ, M)), jnp.zeros((L, RJ, M)), *dirs[n]) for n in maps}
        g = jax.grad(_chunk_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row, dtype,
                                 "scores"))(probes)
        out = []
        for path in paths:
            name, is_a = _map_of(path, maps)
            s_ELM = to_slots(g[name][0 if is_a else 1], slot_pos_E)       # [E, L, M]
            out.append(jnp.swapaxes(s_ELM, 1, 2))
        scores = jnp.concatenate(out, -1)
        return scores, jnp.all(jnp.isfinite(scores.reshape(slots, -1)), axis=1)

    return fn


@dataclasses.dataclass(frozen=True)
class Group:
    """k packed chunks run by ONE call (`lax.map` inside the jit): XLA:CPU maps a fresh
    temp buffer per call, so one call per chunk pays the page faults k times.

    arrays: (ids, segments, positions, targets, slot_pos), each stacked [k, ...].
    index: input index of every output row; the call returns, per device, its slots
    slot-major and chunk-minor (so that the output stays sharded by device).
    examples: input index of every token's example [k, R, T] (-1: padding), laid out as
    the ids: the true Fisher's labels are drawn per example and position from it.
    """
    arrays: tuple
    index: np.ndarray
    num_chunks: int
    chunk_shape: tuple
    examples: np.ndarray
    # arrays and examples hold only this process's rows (an `ExampleShard`'s); index and
    # chunk_shape are the whole call's
    local: bool = False

    @property
    def tokens(self) -> int:
        return self.num_chunks * int(np.prod(self.chunk_shape))

    @staticmethod
    def of(chunks: Sequence[PackedChunk], ndev: int, per_row: int) -> "Group":
        arrays = tuple(np.stack(x) for x in zip(*[(c.ids, c.segments, c.positions, c.targets,
                                                   c.slot_pos) for c in chunks]))
        idx = np.stack([c.index for c in chunks])                       # [k, ndev * E]
        k, e = idx.shape
        index = idx.reshape(k, ndev, e // ndev).transpose(1, 2, 0).reshape(-1)
        return Group(arrays, index, k, tuple(chunks[0].ids.shape),
                     np.stack([token_examples(c, ndev, per_row) for c in chunks]))


def token_examples(c: PackedChunk, ndev: int, per_row: int) -> np.ndarray:
    """The input index of every token's example [R, T] (-1: padding) of a chunk holding
    the rows and slots of `ndev` devices (each device's slot_pos counts its own rows)."""
    R, E = c.ids.shape[0] // ndev, len(c.index) // ndev
    out = np.full(c.ids.shape, -1, np.int32)
    for d in range(ndev):
        at = np.full(R * per_row + 1, -1, np.int32)       # example position r * J + j
        at[c.slot_pos[d * E:(d + 1) * E]] = c.index[d * E:(d + 1) * E]
        seg = c.segments[d * R:(d + 1) * R]
        pos = np.arange(R)[:, None] * per_row + np.maximum(seg, 0)
        out[d * R:(d + 1) * R] = np.where(seg >= 0, at[pos], -1)
    return out


def compiled_fn(graphdef, dtype, slots, per_row, mesh, factors: bool = False,
                sharding: str = "dp", remat: bool = False, scores: bool = False,
                labels_seed: int | None = None):
    """`build_fn`'s jit, cached for the current kernel setting (`switch.use`): a jit's
    trace cache does not see that setting, so each one gets its own jit."""
    return _cached_fn(graphdef, dtype, slots, per_row, mesh, factors, sharding, remat,
                      scores, labels_seed, switch.setting())


@functools.lru_cache(maxsize=8)
def _cached_fn(graphdef, dtype, slots, per_row, mesh, factors, sharding, remat, scores,
               labels_seed, _setting):
    return build_fn(graphdef, dtype, slots, per_row, mesh, factors, sharding, remat, scores,
                    labels_seed=labels_seed)


def clear_cache() -> None:
    """Forget the cached jits of `compiled_fn`."""
    _cached_fn.cache_clear()


def build_fn(graphdef, dtype, slots, per_row, mesh, factors: bool = False,
             sharding: str = "dp", remat: bool | str = False, scores: bool = False,
             inner=None, labels_seed: int | None = None):
    """jit((lora, rest, ids, segments, positions, targets, slot_pos [k, ...])
    -> (grad leaves [E * k, L, ...], finite [E * k])): k chunks in one call, see `Group`;
    with `factors` also the K-FAC token sums of the k chunks (summed over devices). With
    `scores` the call takes the directions h after `rest` and gives (h . g_e per piece
    [E * k, M, P], finite) with no gradient formed (`packed_score_fn`). A fresh jit every
    call (see `compiled_fn` for the cached one).

    Over a mesh each data shard packs and differentiates its own rows and slots. With
    sharding "dp" that is a `shard_map` over the data axis (parameters whole on every
    device); with a sharded preset (`layerif_jax.sharding`) the same per-shard function
    is vmapped over the data shards and XLA partitions the parameters as the rules say
    (gathering an FSDP layer where it is used, splitting heads and MLP under TP).

    remat: the blocks are recomputed in the backward (`ops.layer_remat`: True or "mlp"
    the MLP half, "full" all but the residual stream between blocks). inner: another
    per-chunk function with `packed_grad_fn`'s signature and outputs (e.g. the
    Kronecker-projected gradients, `kronecker.kron_grad_fn`). labels_seed: the true
    Fisher's drawn labels (`packed_grad_fn`); the call then takes `Group.examples` after
    the five arrays.
    """
    if inner is None and scores:
        inner = packed_score_fn(graphdef, slots=slots, per_row=per_row, dtype=dtype)
    elif inner is None:
        inner = packed_grad_fn(graphdef, slots=slots, per_row=per_row, dtype=dtype,
                               factors=factors, labels_seed=labels_seed)
    n_arrays = 5 if labels_seed is None else 6
    extra = 1 if scores else 0   # h: one argument more, the same on every shard

    def fn(*args):   # traced here, so the setting is seen by the decoder
        with layer_remat(remat):
            return inner(*args)

    def local_fn(lora, rest, *args):
        front, arrays = args[:extra], args[extra:]
        slot_major = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
        if not factors:
            g, fin = jax.lax.map(lambda a: fn(lora, rest, *front, *a), arrays)
            return jax.tree.map(slot_major, g), slot_major(fin)

        def step(acc, a):   # the factor sums accumulate in the carry, never stacked
            g, fin, f = fn(lora, rest, *a)
            return [x + y for x, y in zip(acc, f)], (g, fin)

        shapes = jax.eval_shape(lambda: fn(lora, rest, *(x[0] for x in arrays)))[2]
        sums, (g, fin) = jax.lax.scan(step, [jnp.zeros(x.shape, x.dtype) for x in shapes],
                                      arrays)
        return [slot_major(x) for x in g], slot_major(fin), sums

    if mesh is None:
        return jax.jit(local_fn)
    if sharding != "dp":
        return _gspmd_fn(local_fn, mesh, factors, sharding, scores)

    def group_fn(*args):
        out = local_fn(*args)
        return out if not factors else (*out[:2], jax.lax.psum(out[2], mesh.axis_names[0]))

    ax = mesh.axis_names[0]
    group_fn = jax.shard_map(
        group_fn, mesh=mesh, in_specs=(P(), P()) + (P(),) * extra + (P(None, ax),) * n_arrays,
        out_specs=(P(ax), P(ax)) + ((P(),) if factors else ()), check_vma=False)
    return jax.jit(group_fn)


def _gspmd_fn(local_fn, mesh, factors: bool, preset: str, scores: bool = False):
    """The per-shard `local_fn` vmapped over the D data shards of a ("data", "model") mesh,
    the mapped axis on "data"; the output in the shard_map's order (shard-major rows)."""
    D = int(mesh.shape["data"])

    def split(x, axis):   # [..., D * r, ...] -> [D, ..., r, ...]
        x = x.reshape(*x.shape[:axis], D, -1, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    def group_fn(lora, rest, *args):
        front = args[:1] if scores else ()
        arrays = tuple(split(a, 1) for a in args[len(front):])
        # the segment sums take their reference here (`_probed_bwd`); the attention kernel
        # runs in a shard_map of its own (`models.decoder.attention`)
        with shd.activation_rules(mesh, preset):
            out = jax.vmap(lambda a: local_fn(lora, rest, *front, *a),
                           spmd_axis_name="data")(arrays)
        merge = lambda x: x.reshape(-1, *x.shape[2:])   # noqa: E731
        if scores:
            return merge(out[0]), merge(out[1])
        # each example's gradient split like its parameter over "model" (fsdp_tp: heads
        # and MLP), so the kept gradients take 1/model of the memory there too
        g = [jax.lax.with_sharding_constraint(
                merge(x), NamedSharding(mesh, shd.grad_spec(path, x.ndim - 2, preset)))
             for (path, _), x in zip(shd.leaf_paths(lora), out[0])]
        fin = merge(out[1])
        return (g, fin) if not factors else (g, fin, [jnp.sum(x, 0) for x in out[2]])

    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    # the gradients' layout is the constraint's (None: XLA keeps what group_fn says)
    outs = (rows, rows) if scores else (None, rows) + ((rep,) if factors else ())
    return jax.jit(group_fn, out_shardings=outs)


def zero_factors(model) -> dict[str, tuple]:
    """Zero K-FAC factors {LoRA map: (xx [L, I, I], dudu [L, r, r], uu [L, r, r],
    dydy [L, O, O])}, appended to the gradient probes when the factors are wanted."""
    L = model.cfg.num_layers
    return {name: (jnp.zeros((L, d_in, d_in)), jnp.zeros((L, r, r)), jnp.zeros((L, r, r)),
                   jnp.zeros((L, d_out, d_out)))
            for name, (d_in, r, d_out, _) in model.packed_lora().items()}


class PackedEngine:
    """Packed chunks of tokenised examples -> per-example LoRA gradients (piece form:
    every leaf [rows, L, ...]); `chunks_per_call` chunks per compiled call."""

    name = "packed"

    def __init__(self, model, *, dtype, mesh: Mesh | None, chunk_size: int,
                 row_len: int | None, chunks_per_call: int = 1, sharding: str = "dp",
                 remat: bool = False):
        if not supports(model):
            raise LayerIFError(f"{type(model).__name__} does not implement the packed engine's "
                               "interface (packed_lora, hidden_states(group_fn=...), "
                               "next_token_nll): use engine='vmap'")
        if chunks_per_call < 1:
            raise LayerIFError(f"chunks per call must be >= 1, got {chunks_per_call}")
        self.model, self.chunks_per_call = model, chunks_per_call
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.LoRAParam, ...)
        self.sharding = shd.check_preset(sharding) if mesh is not None else "dp"
        if mesh is not None and (self.sharding != "dp" or mesh.devices.ndim != 1):
            mesh = shd.check_mesh(shd.as_2d(mesh), self.sharding)
        self.dtype, self.mesh, self.remat = dtype, mesh, remat_mode(remat)
        self.ndev = shd.data_size(mesh)
        self.chunk_size, self.row_len = chunk_size, row_len
        if mesh is not None:
            data = mesh.axis_names[0]
            if self.sharding == "dp":
                rep = NamedSharding(mesh, P())
                self.params, self.rest = put(self.params, rep), put(self.rest, rep)
            else:   # every dimension checked against its mesh axis before anything is put
                sh_p = shd.shardings(self.params, mesh, self.sharding)
                sh_r = shd.shardings(self.rest, mesh, self.sharding)
                self.params, self.rest = put(self.params, sh_p), put(self.rest, sh_r)
            self._group_shard = NamedSharding(mesh, P(None, data))

    def plan(self, example_sets: Sequence[Sequence[Example] | ExampleShard]) -> None:
        """Fix the chunk shapes once for all example sets (one compilation); the lengths of
        an `ExampleShard`'s whole set are gathered from every process."""
        lengths = np.concatenate([_lengths(ex) for ex in example_sets])
        per_dev = max(1, -(-self.chunk_size // self.ndev))
        self.rows, self.row_len_, self.slots_local, self.per_row = plan(
            lengths, chunk_size=per_dev, row_len=self.row_len)
        self.slots = self.slots_local * self.ndev
        self.fn = compiled_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                              self.mesh, False, self.sharding, self.remat)

    def chunks(self, examples: Sequence[Example] | ExampleShard) -> list[Group]:
        if isinstance(examples, ExampleShard):
            return self._shard_groups(examples)
        chunks = self.packed_chunks(examples)
        k = self.chunks_per_call
        return [Group.of(chunks[i:i + k], self.ndev, self.per_row)
                for i in range(0, len(chunks), k)]

    def _shard_groups(self, shard: ExampleShard) -> list[Group]:
        """The calls of a multi-process run where each process holds only its share of the
        examples: it packs them into its own data shards' rows (its block of the data
        axis), the processes agree on the number of chunks (the most any needs; empty
        ones fill), and the calls' whole index is gathered (input index of every row)."""
        blocks = data_blocks(self.mesh)
        if blocks is None:
            raise LayerIFError("an example shard needs a multi-process mesh in which every "
                               "process holds whole rows of the data axis, the same number "
                               "each, in one block (pass the whole example list otherwise)")
        G = len(blocks)
        nd = self.ndev // G
        local = pack_chunks(shard.examples, rows=self.rows, row_len=self.row_len_,
                            slots=self.slots_local, per_row=self.per_row) \
            if len(shard.examples) else []
        where = np.asarray(shard.index, np.int32)
        local = [dataclasses.replace(c, index=np.where(c.index >= 0,
                                                       where[np.maximum(c.index, 0)], -1))
                 for c in local]
        pieces = max(int(x[0]) for x in gather_host(np.array([-(-len(local) // nd)])))
        while len(local) < pieces * nd:
            local.append(empty_chunk(self.rows, self.row_len_, self.slots_local, self.per_row))
        own = [PackedChunk(*(np.concatenate(parts) for parts in zip(
                   *(dataclasses.astuple(c) for c in local[k:k + nd]))))
               for k in range(0, len(local), nd)]
        k = self.chunks_per_call
        groups = [Group.of(own[i:i + k], nd, self.per_row) for i in range(0, len(own), k)]
        every = gather_host(np.concatenate([g.index for g in groups]).astype(np.int32))
        out, off = [], 0
        for g in groups:   # the whole call: the processes' rows in the data axis' order
            n = len(g.index)
            whole = np.concatenate([every[p][off:off + n] for p in blocks])
            out.append(dataclasses.replace(g, index=whole, local=True, chunk_shape=(
                g.chunk_shape[0] * G, *g.chunk_shape[1:])))
            off += n
        return out

    def packed_chunks(self, examples: Sequence[Example]) -> list[PackedChunk]:
        """The packed chunks (each with the rows of every device), before grouping."""
        local = pack_chunks(examples, rows=self.rows, row_len=self.row_len_,
                            slots=self.slots_local, per_row=self.per_row)
        while len(local) % self.ndev:
            local.append(empty_chunk(self.rows, self.row_len_, self.slots_local, self.per_row))
        return [PackedChunk(*(np.concatenate(parts) for parts in zip(
                    *(dataclasses.astuple(c) for c in local[k:k + self.ndev]))))
                for k in range(0, len(local), self.ndev)]

    def _put(self, c: Group, examples: bool = False) -> tuple:
        arrays = c.arrays + ((c.examples,) if examples else ())
        if self.mesh is None:
            return arrays
        if c.local:   # this process's rows of every array [k, rows, ...]
            G = c.chunk_shape[0] // c.arrays[0].shape[1]
            return tuple(jax.make_array_from_process_local_data(
                self._group_shard, a, (a.shape[0], a.shape[1] * G, *a.shape[2:]))
                for a in arrays)
        return tuple(put(a, self._group_shard) for a in arrays)

    def grads(self, c: Group) -> tuple[list[jax.Array], jax.Array]:
        return self.fn(self.params, self.rest, *self._put(c))

    def scores(self, c: Group, h: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(h_m . g_e per piece [rows, M, P], finite [rows]) of a call's examples, as
        `core.dots(grads(c)[0], h)` but with no per-example gradient formed
        (`packed_score_fn`). h: leaves [M, L, ...] in the LoRA state's leaf order."""
        fn = compiled_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                         self.mesh, False, self.sharding, self.remat, True)
        if self.mesh is not None:
            h = put(list(h), NamedSharding(self.mesh, P()))
        return fn(self.params, self.rest, list(h), *self._put(c))

    def direct_scores(self, M: int) -> bool:
        """Whether `scores` is the cheaper way to the scores of M directions: per token it
        costs a rank-(M r) GEMM where forming the gradients of the row's J example slots
        costs J rank-r ones, plus their dots with h (per example, ~ M rank-r per token)."""
        return M <= self.per_row

    def grad_layout(self, g: list[jax.Array]) -> list[jax.Array]:
        """Gradient leaves (e.g. restored from a checkpoint, rows over "data") laid out as
        `grads` makes them: under a sharded preset each leaf split like its LoRA factor
        over "model" too (`sharding.grad_spec`)."""
        if self.mesh is None or self.sharding == "dp":
            return g
        return [jax.device_put(x, NamedSharding(self.mesh, shd.grad_spec(path, x.ndim - 1,
                                                                          self.sharding)))
                for (path, _), x in zip(shd.leaf_paths(self.params), g)]

    def grads_and_factors(self, c: Group) -> tuple[list[jax.Array], jax.Array, list]:
        """`grads` plus the K-FAC token sums of the call ([left, right] per leaf), from
        the same backward: the covariance products are the only extra work."""
        fn = compiled_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                         self.mesh, True, self.sharding, self.remat)
        return fn(self.params, self.rest, *self._put(c))

    def true_fisher(self, c: Group, factors: bool = False) -> tuple:
        """`grads` (with `factors`: `grads_and_factors`) of a call at labels drawn from the
        model itself (`packed_loss`; seed `general.TRUE_FISHER_SEED`) instead of the data's
        next tokens: the same draws in every call, chunking and device layout, so a
        second pass over the same examples gives the same gradients."""
        fn = compiled_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                         self.mesh, factors, self.sharding, self.remat,
                         labels_seed=TRUE_FISHER_SEED)
        return fn(self.params, self.rest, *self._put(c, examples=True))

    def kfac_factors(self, sums: list, calls: Sequence[Group], n: int) -> list:
        """The K-FAC factors of every LoRA leaf (float64, left [L, a, a], right [L, b, b])
        from the training calls' token sums, normalised so that left (x) right ~ the
        empirical Fisher (1/n) sum_i g_i g_i^T of each layer's piece: left per token
        (over the N training tokens), right per example (K-FAC "expand")."""
        tokens = int(sum((c.arrays[1] >= 0).sum() for c in calls))
        if any(c.local for c in calls):   # each process holds its own rows' tokens
            tokens = int(sum(int(x[0]) for x in gather_host(np.array([tokens]))))
        tokens = max(1, tokens)
        host = [np.asarray(jax.device_get(x), np.float64) for x in sums]
        return [(host[2 * k] / tokens, host[2 * k + 1] / n) for k in range(len(host) // 2)]

    def describe(self, calls: Sequence[Group]) -> dict[str, Any]:
        return {"chunk_slots": self.slots, "chunk_shapes": sorted({c.chunk_shape for c in calls}),
                "sharding": self.sharding,
                "chunks": sum(c.num_chunks for c in calls)}
