"""The MoE-LoRA model: per-layer expert counts, routers, dense gated experts."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...errors import LayerIFError
from ...models.config import LINEARS
from ...models.decoder import attention_bias, block_fn, linear_apply, rope_inv_freq
from ...models.lora import normalize_targets
from ...ops import mm

__all__ = ["RouterParam", "TRAINABLE", "resolve_top_k", "check_experts", "moe_delta",
           "MoELinear", "MoEBlock", "moe_block_apply", "MoELoraModel"]


class RouterParam(nnx.Param):
    """A router matrix W_r [d_in, s]; trained together with the experts (not frozen)."""


TRAINABLE = (nnx.LoRAParam, RouterParam)  # an "any of" filter: experts and routers


def resolve_top_k(experts: Sequence[int], top_k=None) -> list[int]:
    """Per-layer top-k: None -> 2 where s_l > 1 else 1; an int -> that for every layer; a
    sequence -> per layer. Any k > s_l (or k < 1) is a LayerIFError."""
    counts = [int(s) for s in experts]
    if top_k is None:
        return [2 if s > 1 else 1 for s in counts]
    if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool):
        ks = [int(top_k)] * len(counts)
    else:
        ks = [int(k) for k in top_k]
        if len(ks) != len(counts):
            raise LayerIFError(f"top_k has {len(ks)} entries but there are {len(counts)} layers")
    for l, (k, s) in enumerate(zip(ks, counts)):
        if k < 1:
            raise LayerIFError(f"top-k must be >= 1, got {k} for layer {l}")
        if k > s:
            raise LayerIFError(f"top-k {k} exceeds the {s} expert(s) of layer {l}")
    return ks


def check_experts(experts, num_layers: int) -> list[int]:
    try:
        counts = [int(s) for s in experts]
        if any(float(s) != int(s) for s in experts):
            raise ValueError
    except (TypeError, ValueError):
        raise LayerIFError(f"expert counts must be integers, got {experts!r}") from None
    if len(counts) != num_layers:
        raise LayerIFError(f"{len(counts)} expert counts given but the model has "
                           f"{num_layers} layers")
    bad = [l for l, s in enumerate(counts) if s < 1]
    if bad:
        raise LayerIFError(f"every layer needs >= 1 expert; layer {bad[0]} has {counts[bad[0]]}")
    return counts


def moe_delta(x: jax.Array, a: jax.Array, b: jax.Array, router: jax.Array, *, top_k: int,
              scale: float, dtype, token_weight: jax.Array | None = None):
    """sum_{j in topk} p_j scale (x A_j) B_j for x[..., d_in]; a [s, d_in, r], b [s, r, d_out],
    router [d_in, s]. Returns (delta [..., d_out] in `dtype`, Switch balance loss (float32
    scalar; 0 for s == 1)). `token_weight` [N] (1 = real token) weights the balance loss."""
    s, d_in, r = a.shape
    d_out = b.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    N = x2.shape[0]
    logits = jnp.dot(x2.astype(jnp.float32), router.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)                                    # [N, s] f32
    if top_k >= s:
        gates = probs / jnp.sum(probs, -1, keepdims=True)
        onehot = None
    else:
        vals, idx = jax.lax.top_k(probs, top_k)                                # [N, k]
        vals = vals / jnp.sum(vals, -1, keepdims=True)
        onehot = jax.nn.one_hot(idx, s, dtype=jnp.float32)                     # [N, k, s]
        gates = jnp.einsum("nk,nks->ns", vals, onehot)                         # 0 outside top-k
    a_cat = jnp.transpose(a, (1, 0, 2)).reshape(d_in, s * r).astype(dtype)
    u = mm(x2.astype(dtype), a_cat).reshape(N, s, r)
    u = (u.astype(jnp.float32) * (scale * gates)[:, :, None]).astype(dtype).reshape(N, s * r)
    delta = mm(u, b.reshape(s * r, d_out).astype(dtype)).reshape(*lead, d_out)

    if s == 1:
        aux = jnp.zeros((), jnp.float32)
    else:
        w = jnp.ones((N,), jnp.float32) if token_weight is None else token_weight
        n = jnp.maximum(jnp.sum(w), 1.0)
        routed = (jnp.ones((N, s), jnp.float32) if onehot is None
                  else jnp.sum(onehot, axis=1))                                # [N, s] 0/1
        f = jnp.sum(routed * w[:, None], 0) / (n * top_k)
        P = jnp.sum(probs * w[:, None], 0) / n
        aux = s * jnp.sum(f * P)
    return delta, aux


class MoELinear(nnx.Module):
    """s LoRA experts and a router for one linear map of one block."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, rank: int, scale: float,
                 top_k: int, *, dtype=jnp.float32, rng: np.random.Generator):
        # host-side init (numpy, seeded from the model's nnx.Rngs): no per-shape device
        # compilation for the ~7 L differently shaped expert tensors
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.rank = int(rank)
        self.scale = float(scale)
        a = rng.standard_normal((num_experts, d_in, rank), np.float32) / rank  # peft "gaussian"
        self.lora_a = nnx.LoRAParam(jnp.asarray(a, dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((num_experts, rank, d_out), dtype))
        bound = 1.0 / math.sqrt(d_in)  # torch nn.Linear's default (MoLA's router)
        self.router = RouterParam(jnp.asarray(
            rng.uniform(-bound, bound, (d_in, num_experts)).astype(np.float32), dtype))

    def delta(self, x, *, dtype, token_weight=None):
        return moe_delta(x, self.lora_a[...], self.lora_b[...], self.router[...],
                         top_k=self.top_k, scale=self.scale, dtype=dtype,
                         token_weight=token_weight)


class MoEBlock(nnx.Module):
    """The MoE linears of one block: attribute <name> for each target name."""

    def __init__(self, cfg, targets, num_experts, rank, scale, top_k, *, dtype, rng):
        self.targets = tuple(targets)
        for name in targets:
            d_in, d_out = cfg.linear_shape(name)
            setattr(self, name, MoELinear(d_in, d_out, num_experts, rank, scale, top_k,
                                          dtype=dtype, rng=rng))

    def get(self, name):
        return getattr(self, name) if name in self.targets else None


def moe_block_apply(cfg, p, block: MoEBlock, x_BTD, bias, pos_BT, inv_freq, *, dtype,
                    token_weight=None):
    """One decoder block (as `decoder.block_apply`) with MoE-LoRA on the target linears.
    Returns (x, sum of the balance losses of its MoE linears with s > 1)."""
    aux = []

    def lin(name, h):
        y = linear_apply(p[name], h, scale=0.0, dropout=0.0, key=None, dtype=dtype)
        m = block.get(name)
        if m is None:
            return y
        d, a = m.delta(h, dtype=dtype, token_weight=token_weight)
        if m.num_experts > 1:
            aux.append(a)
        return y + d

    return block_fn(cfg)(cfg, p, x_BTD, bias, pos_BT, inv_freq,
                         lambda names, h: tuple(lin(n, h) for n in names), dtype), aux


class MoELoraModel(nnx.Module):
    """A frozen base `Decoder` with MoE-LoRA on every target linear map of every block.

    `experts`: s_l per layer (>= 1). `top_k`: None (2 where s_l > 1 else 1), an int, or a
    per-layer list (k > s_l is an error). `model(ids, mask)` -> logits [B, T, V] float32;
    `return_aux=True` also returns the load-balancing loss.
    """

    def __init__(self, base, experts: Sequence[int], *, rank: int = 8, alpha: float = 16.0,
                 targets=LINEARS, top_k=None, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if getattr(base, "lora_config", None) is not None or nnx.state(base, nnx.LoRAParam):
            raise LayerIFError("the base model carries a LoRA adapter: merge it first "
                               "(MoE experts are the only LoRA parameters of the model)")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        L = base.cfg.num_layers
        counts = check_experts(experts, L)
        if isinstance(rank, bool) or int(rank) != rank or rank < 1:
            raise LayerIFError(f"expert rank must be an integer >= 1, got {rank!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise LayerIFError(f"alpha must be > 0, got {alpha!r}")
        self.base = base
        self.experts = tuple(counts)
        self.top_k = tuple(resolve_top_k(counts, top_k))
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.targets = normalize_targets(targets)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rngs.params())).ravel())
        self.blocks = nnx.List([
            MoEBlock(base.cfg, self.targets, counts[l], self.rank, self.alpha / self.rank,
                     self.top_k[l], dtype=dtype, rng=rng) for l in range(L)])

    @property
    def cfg(self):
        return self.base.cfg

    def spec(self) -> dict[str, Any]:
        return {"experts": list(self.experts), "top_k": list(self.top_k), "rank": self.rank,
                "alpha": self.alpha, "targets": list(self.targets)}

    def hidden_states(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                      dtype=None):
        """(final hidden states before the last norm, mean balance loss)."""
        base, cfg = self.base, self.base.cfg
        dtype = dtype or base.dtype
        B, T = ids_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        biases = {w: attention_bias(mask_BT, pos_BT, w, segments_BT)
                  for w in {cfg.window_of(l) for l in range(cfg.num_layers)}}
        inv_freq = rope_inv_freq(cfg)
        stacked = base.layers.layer_arrays()
        tokw = mask_BT.reshape(-1).astype(jnp.float32)
        x = base.embed(ids_BT, dtype)
        aux = []
        for l in range(cfg.num_layers):  # unrolled: per-layer expert counts differ
            p = jax.tree.map(lambda arr: arr[l], stacked)
            x, a = moe_block_apply(cfg, p, self.blocks[l], x, biases[cfg.window_of(l)], pos_BT,
                                   inv_freq,
                                   dtype=dtype, token_weight=tokw)
            aux.extend(a)
        aux_mean = (sum(aux) / len(aux)) if aux else jnp.zeros((), jnp.float32)
        return x, aux_mean

    def __call__(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                 dropout_key=None, dtype=None, return_aux: bool = False):
        del dropout_key  # no expert dropout
        x, aux = self.hidden_states(ids_BT, mask_BT, positions_BT=positions_BT,
                                    segments_BT=segments_BT, dtype=dtype)
        logits = self.base.head(x)
        return (logits, aux) if return_aux else logits

    def linear_output(self, layer: int, name: str, x, dtype=jnp.float32):
        """y = x W0 (+ b) + MoE delta of one linear map (for tests and inspection)."""
        p = jax.tree.map(lambda arr: arr[layer], self.base.layers.linears()[name].layer_arrays())
        p = {k: v for k, v in p.items() if k in ("kernel", "bias")}
        y = linear_apply(p, x, scale=0.0, dropout=0.0, key=None, dtype=dtype)
        m = self.blocks[layer].get(name)
        return y if m is None else y + m.delta(x, dtype=dtype)[0]
