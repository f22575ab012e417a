"""One Flax NNX decoder for the Llama, Mistral, Qwen2 and Gemma families.

The L blocks are stored *stacked*: every block parameter has a leading layer axis
(`kernel_LxIxO`), and the forward pass is one `jax.lax.scan` over that axis. Two
reasons: compile time does not grow with depth (one block is traced, not 30), and
"all layers at once" is literal for the influence core — a per-example LoRA
gradient has shape [n, L, ...] and every per-layer reduction is one vectorised op.

Names follow the Hugging Face modules (q_proj ... down_proj, input_layernorm, ...)
so the checkpoint map stays a table. Kernels are stored (d_in, d_out): y = x W.

LoRA (`y = x W0 + (alpha/r) (drop(x) A) B`) lives on the same `StackedLinear`,
typed `nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates it
from the frozen base.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from ..kernels import switch
from ..kernels.segment_attention import KERNEL_PLATFORMS as ATTENTION_KERNEL_PLATFORMS
from ..kernels.segment_attention import segment_attention
from ..kernels.segment_attention import target as attention_target

from .. import sharding as shd
from ..ops import mm, remat_layers, target_platform, unroll_layers
from ..sharding import constrain
from .config import LINEARS, ModelConfig

NEG_INF = -1e30  # finite: a fully masked (padding) query row must not give NaN
# the linear maps of a block, grouped by the activation that feeds them
GROUPS = (("attn_in", ("q_proj", "k_proj", "v_proj")), ("o_in", ("o_proj",)),
          ("mlp_in", ("gate_proj", "up_proj")), ("down_in", ("down_proj",)))
INPUT_OF = {n: g for g, names in GROUPS for n in names}


class StackedLinear(nnx.Module):
    """L linear maps x W + b with optional LoRA, stacked along a leading layer axis."""

    def __init__(self, num_layers: int, d_in: int, d_out: int, *, bias: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (num_layers, d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((num_layers, d_out), dtype)) if bias else None
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)  # data, so LoRA can be attached later
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: float = 0.0

    def layer_arrays(self) -> dict[str, jax.Array]:
        """The raw arrays (leading layer axis) that `linear_apply` consumes inside the scan."""
        out = {"kernel": self.kernel[...]}
        if self.bias is not None:
            out["bias"] = self.bias[...]
        if self.lora_a is not None:
            out["lora_a"] = self.lora_a[...]
            out["lora_b"] = self.lora_b[...]
        return out


def linear_apply(p: dict[str, jax.Array], x: jax.Array, *, scale: float, dropout: float,
                 key: jax.Array | None, dtype) -> jax.Array:
    """One layer's slice of a StackedLinear: x[..., I] -> y[..., O] = x W (+ b) + s (x A) B."""
    y = mm(x, p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if "lora_a" in p:
        xl = x
        if dropout > 0.0 and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
            xl = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        u = mm(xl, p["lora_a"].astype(dtype))
        y = y + (scale * mm(u, p["lora_b"].astype(dtype))).astype(dtype)
    return y


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:  # Gemma: scale in float32, then cast
        return (xf * (offset + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if not cfg.rope_scaling:
        return inv
    sc = dict(cfg.rope_scaling)
    rtype = sc.get("rope_type", sc.get("type"))
    factor = float(sc.get("factor", 1.0))
    if rtype == "linear":
        return inv / factor
    # llama3: smooth interpolation between low- and high-frequency bands
    lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x_BTHD: jax.Array, pos_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention, not llama.cpp's interleaved one)."""
    ang = pos_BT[..., None].astype(jnp.float32) * inv_freq  # B,T,D/2
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    xf = x_BTHD.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x_BTHD.dtype)


def attention_bias(mask_BT: jax.Array, pos_BT: jax.Array, window: int | None,
                   segments_BT: jax.Array | None = None) -> jax.Array:
    """Additive bias [B,1,1,T,T]: causal, key padding, optional sliding window.

    With `segments_BT` (packed rows: several examples per row), a query only sees
    keys of its own segment.
    """
    qp, kp = pos_BT[:, :, None], pos_BT[:, None, :]
    T = mask_BT.shape[1]
    idx = jnp.arange(T)
    ok = (idx[:, None] >= idx[None, :])[None] & mask_BT[:, None, :].astype(bool)
    if segments_BT is not None:
        ok = ok & (segments_BT[:, :, None] == segments_BT[:, None, :])
    if window is not None:
        ok = ok & (qp - kp < window)
    return jnp.where(ok, 0.0, NEG_INF)[:, None, None, :, :].astype(jnp.float32)


@jax.custom_vjp
def softmax_last(x: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward keeps ONE residual, its output y:
    dx = y * (dy - sum(y * dy)). (Autodiff of jax.nn.softmax also keeps exp(x - max),
    an extra [B*K, G*T, T] array per layer that the layer scan stacks.)"""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
    y = jax.nn.softmax(x, axis=-1)
    return y, y


def _softmax_bwd(y, dy):
    return (y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True)),)


softmax_last.defvjp(_softmax_fwd, _softmax_bwd)


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys the queries of a layer see, in one of two forms: the additive biases of
    the dense path (`biases` [W, B, 1, 1, T, T], one per distinct window of the model's
    layers) or, for the attention kernel (`kernels.segment_attention`: splash attention
    with segment ids on a TPU, Triton's flash attention on an NVIDIA GPU), only the example of every token (`segments` [B, T] int32,
    negative for padding) with the windows as static numbers. `which`: the layer's index
    into `windows` ([L] for all layers before `layer` picks one inside the layer scan).
    """
    biases: jax.Array | None
    segments: jax.Array | None
    which: jax.Array
    windows: tuple = ()
    interpret: bool = False

    def layer(self, which) -> "AttentionMask":
        return dataclasses.replace(self, which=which)

    def dense_bias(self) -> jax.Array:
        return self.biases[0] if self.biases.shape[0] == 1 else self.biases[self.which]


jax.tree_util.register_dataclass(AttentionMask, data_fields=["biases", "segments", "which"],
                                 meta_fields=["windows", "interpret"])


_DENSE: contextvars.ContextVar[bool] = contextvars.ContextVar("layerif_dense_attention",
                                                              default=False)


@contextlib.contextmanager
def dense_attention():
    """Inside: the dense attention path whatever the kernel setting. The plans count FLOPs
    and bytes with it: splash attention's Pallas calls declare no cost, so the compiler's
    cost analysis would count the kernel's attention as nothing."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


def attention_masks(cfg: ModelConfig, mask_BT, pos_BT, segments_BT=None) -> AttentionMask:
    """The layers' `AttentionMask`: the kernel's segments when `switch.resolve` picks the
    attention kernel for the platform being compiled for (`ops.target_platform`), else the
    dense biases (`layer_biases`; also inside `dense_attention()`). The kernel's form
    assumes what packed and plain rows give: each example's tokens consecutive, with
    consecutive positions (a window counts tokens)."""
    impl, interpret = switch.resolve(None, None, attention_target(target_platform()),
                                      ATTENTION_KERNEL_PLATFORMS)
    if impl == "reference" or _DENSE.get():
        biases, which = layer_biases(cfg, mask_BT, pos_BT, segments_BT)
        return AttentionMask(biases, None, which, layer_windows(cfg)[0])
    distinct, which = layer_windows(cfg)
    seg = jnp.zeros(mask_BT.shape, jnp.int32) if segments_BT is None else segments_BT
    seg = jnp.where(mask_BT.astype(bool) & (seg >= 0), seg, -1).astype(jnp.int32)
    return AttentionMask(None, seg, which, distinct, interpret)


def _kernel_attention(q_BTHD, k_BTKD, v_BTKD, m: AttentionMask, dtype, scale, softcap):
    """`kernels.segment_attention` for the layer's window (a switch over the model's
    distinct windows when they differ by layer). Under a sharded preset's activation
    rules (the packed engine's per-shard function vmapped over "data") it runs in a
    shard_map, heads split like the q / k / v projections' outputs: XLA cannot partition
    a Pallas call itself."""
    B, T, H, D = q_BTHD.shape

    def run(window):
        return lambda q, k, v, s: segment_attention(q, k, v, s, scale=scale, softcap=softcap,
                                                    window=window, impl="kernel",
                                                    interpret=m.interpret,
                                                    platform=target_platform())

    fns = [run(w) for w in m.windows]
    call = fns[0] if len(fns) == 1 else (
        lambda q, k, v, s, w: jax.lax.switch(w, fns, q, k, v, s))
    args = (q_BTHD, k_BTKD, v_BTKD, m.segments) + (() if len(fns) == 1 else (m.which,))
    active = shd.active_rules()
    if active is not None:
        mesh, preset = active
        heads = shd.spec(("heads",), preset)[0]
        size = 1 if heads is None else math.prod(mesh.shape[a] for a in (
            heads if isinstance(heads, tuple) else (heads,)))
        if H % size or k_BTKD.shape[2] % size:
            heads = None
        hs = jax.sharding.PartitionSpec(None, None, heads, None)
        rep = jax.sharding.PartitionSpec()
        call = jax.shard_map(call, mesh=mesh, in_specs=(hs, hs, hs, rep) + (rep,) * (
            len(args) - 4), out_specs=hs, check_vma=False)
    return call(*args).reshape(B, T, H * D).astype(dtype)


def attention(q_BTHD, k_BTKD, v_BTKD, bias, dtype, *, scale: float | None = None,
              softcap: float | None = None) -> jax.Array:
    """Grouped-query attention -> [B, T, H*D]. Softmax in float32. `scale` (default
    1/sqrt(D)) multiplies the scores; `softcap` caps them: cap * tanh(s / cap).
    `bias`: an `AttentionMask` (the layer's: dense biases or the kernel's segments) or
    an additive bias [B, 1, 1, T, T].

    The dense path is laid out as plain batched matmuls over (batch, kv-head):
    [B*K, G*T, D] x [B*K, D, S]; XLA:CPU runs this about twice as fast as the equivalent
    5-D einsum.
    """
    B, T, H, D = q_BTHD.shape
    if isinstance(bias, AttentionMask):
        if bias.biases is None:
            return _kernel_attention(q_BTHD, k_BTKD, v_BTKD, bias, dtype,
                                     scale if scale is not None else 1.0 / math.sqrt(D),
                                     softcap)
        bias = bias.dense_bias()
    K = k_BTKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, D)
    k = k_BTKD.transpose(0, 2, 3, 1).reshape(B * K, D, T)
    v = v_BTKD.transpose(0, 2, 1, 3).reshape(B * K, T, D)
    s = jnp.matmul(q, k, preferred_element_type=jnp.float32) * (
        scale if scale is not None else 1.0 / math.sqrt(D))
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    # the softmax runs in the matmul's layout, so that under autodiff its output is ONE
    # residual (shared by the softmax and the w @ v backward), not two copies
    bias = jnp.broadcast_to(bias, (B, K, G, T, T)).reshape(B * K, G * T, T)
    w = softmax_last(s + bias).astype(dtype)
    o = jnp.matmul(w, v).reshape(B, K, G, T, D)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=(name == "gelu_pytorch_tanh"))


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
    """silu(g) * u, whose backward keeps only g and u (autodiff keeps four more
    [tokens, d_ff] arrays: sigmoid(g), its derivative, products), recomputing the rest."""
    return jax.nn.silu(g) * u


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dy):
    g, u = res
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    return dy * u * (sig * (1 + g * (1 - sig))), dy * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def glu(name: str, g: jax.Array, u: jax.Array) -> jax.Array:
    """activation(g) * u: the gated MLP's product."""
    return swiglu(g, u) if name == "silu" else activation(name, g) * u


Lins = Callable[[tuple[str, ...], jax.Array], tuple[jax.Array, ...]]

KEPT = "layerif_kept"   # the values `layer_remat("mlp")` keeps for the backward


def _attention_kept(lins: Lins) -> Lins:
    """`lins` whose attention half is kept under `layer_remat("mlp")`: the q, k, v
    projections, the attention output (o_proj's input) and o_proj's output are named
    KEPT; everything else in a block (norms, rotary, scores, softmax, the MLP) is
    recomputed in the backward from them and the block's input."""
    def kept(names, h):
        group = INPUT_OF[names[0]]
        if group not in ("attn_in", "o_in"):
            return lins(names, h)
        if group == "o_in":
            h = checkpoint_name(h, KEPT)
        return tuple(checkpoint_name(y, KEPT) for y in lins(names, h))
    return kept


def plain_lins(p: dict[str, Any], *, lora: dict[str, tuple[float, float]],
               key: jax.Array | None, dtype) -> Lins:
    """The plain path: each linear map of a group on its own (LoRA and dropout included)."""
    keys = dict(zip(LINEARS, jax.random.split(key, len(LINEARS)))) if key is not None else {}

    def lins(names, h):
        return tuple(linear_apply(p[n], h, scale=lora.get(n, (0.0, 0.0))[0],
                                  dropout=lora.get(n, (0.0, 0.0))[1], key=keys.get(n),
                                  dtype=dtype) for n in names)
    return lins


def block_fn(cfg: ModelConfig) -> Callable:
    """The family's block: `block(cfg, p, x, bias, pos, inv_freq, lins, dtype)`, where
    `lins(names, h)` applies the linear maps `names`, which share the input h (a group
    of GROUPS), and returns their outputs: the plain path (`plain_lins`), MoE-LoRA, an
    influence engine's instrumented maps, or a recorder of the inputs (pruning)."""
    return cfg.family.block


def block_apply(cfg: ModelConfig, p: dict[str, Any], x_BTD: jax.Array, bias, pos_BT, inv_freq,
                *, lora: dict[str, tuple[float, float]], key: jax.Array | None, dtype):
    """One decoder block on the plain path. `p` holds this layer's slice of every
    stacked parameter."""
    return block_fn(cfg)(cfg, p, x_BTD, bias, pos_BT, inv_freq,
                         plain_lins(p, lora=lora, key=key, dtype=dtype), dtype)


def layer_biases(cfg: ModelConfig, mask_BT, pos_BT, segments_BT=None):
    """(biases [W, B, 1, 1, T, T] for the W distinct windows of the layers, which [L]:
    the index of each layer's)."""
    distinct, which = layer_windows(cfg)
    biases = jnp.stack([attention_bias(mask_BT, pos_BT, w, segments_BT) for w in distinct])
    return biases, which


def layer_windows(cfg: ModelConfig) -> tuple[tuple, jax.Array]:
    """(the distinct sliding windows of the layers (None: full causal), which [L]: the
    index of each layer's)."""
    windows = [cfg.window_of(l) for l in range(cfg.num_layers)]
    distinct = tuple(dict.fromkeys(windows))
    return distinct, jnp.asarray([distinct.index(w) for w in windows], jnp.int32)


def recording_lins(p: dict[str, Any], recorded: dict[str, jax.Array], dtype) -> Lins:
    """The plain path (LoRA ignored) that records each group's input h, keyed as in
    INPUT_OF: what pruning calibrates on."""
    def lins(names, h):
        recorded[INPUT_OF[names[0]]] = h
        return tuple(linear_apply({k: v for k, v in p[n].items() if k in ("kernel", "bias")},
                                  h, scale=0.0, dropout=0.0, key=None, dtype=dtype)
                     for n in names)
    return lins


class Blocks(nnx.Module):
    """All L decoder blocks, every parameter stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        L = cfg.num_layers
        for name in LINEARS:
            d_in, d_out = cfg.linear_shape(name)
            setattr(self, name, StackedLinear(L, d_in, d_out, bias=cfg.has_bias(name),
                                              dtype=dtype, rngs=rngs))
        init_w = 0.0 if cfg.norm_offset else 1.0
        fam = cfg.family
        self.norm_names = fam.norms + fam.head_norms
        for n in fam.norms:
            setattr(self, n, nnx.Param(jnp.full((L, cfg.hidden_size), init_w, dtype)))
        for n in fam.head_norms:
            setattr(self, n, nnx.Param(jnp.full((L, cfg.head_dim), init_w, dtype)))

    def linears(self) -> dict[str, StackedLinear]:
        return {n: getattr(self, n) for n in LINEARS}

    def layer_arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: lin.layer_arrays() for n, lin in self.linears().items()}
        for n in self.norm_names:
            out[n] = getattr(self, n)[...]
        return out

    def lora_settings(self) -> dict[str, tuple[float, float]]:
        return {n: (lin.lora_scale, lin.lora_dropout)
                for n, lin in self.linears().items() if lin.lora_a is not None}


class Decoder(nnx.Module):
    """Decoder-only LM. `model(ids_BT)` -> logits_BTV (float32)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = Blocks(cfg, dtype=dtype, rngs=rngs)
        self.norm = nnx.Param(jnp.full((cfg.hidden_size,), 0.0 if cfg.norm_offset else 1.0, dtype))
        self.lora_config = None
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype))

    @property
    def dtype(self):
        return self.embed_tokens[...].dtype

    # -- pieces, usable one block at a time (pruning calibration) --------------------
    def embed(self, ids_BT: jax.Array, dtype=None) -> jax.Array:
        dtype = dtype or self.dtype
        x = jnp.take(self.embed_tokens[...], ids_BT, axis=0).astype(dtype)
        if self.cfg.embed_scale is not None:
            x = x * jnp.asarray(self.cfg.embed_scale, dtype)
        return x

    def head(self, x_BTD: jax.Array) -> jax.Array:
        x = rms_norm(x_BTD, self.norm[...], self.cfg.rms_norm_eps, self.cfg.norm_offset)
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        B, T, D = x.shape
        out = jnp.dot(x.reshape(B * T, D), w.astype(x.dtype), preferred_element_type=jnp.float32)
        return self.softcap(out.reshape(B, T, -1))

    def softcap(self, logits):
        cap = self.cfg.final_logit_softcap
        return logits if not cap else cap * jnp.tanh(logits / cap)

    def hidden_states(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                      dropout_key=None, dtype=None, group_fn=None, layer_data=None):
        """Final hidden states (before the last norm).

        segments_BT: packed rows (attention stays inside a segment; pass positions
        that restart per segment). group_fn(p, data, names, h): replaces the plain
        linear maps of every group (an influence engine's hook, see
        `influence.engines.packed.PackedModel`); `data` is the layer's slice of
        `layer_data`, a pytree whose leaves have a leading layer axis.
        """
        cfg = self.cfg
        dtype = dtype or self.dtype
        B, T = ids_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        masks = attention_masks(cfg, mask_BT, pos_BT, segments_BT)
        inv_freq = rope_inv_freq(cfg)
        lora = self.layers.lora_settings()
        keys = (jax.random.split(dropout_key, cfg.num_layers) if dropout_key is not None
                else None)
        block = block_fn(cfg)

        remat = remat_layers()

        def body(x, xs):
            p, key, data, w = xs
            lins = (plain_lins(p, lora=lora, key=key, dtype=dtype) if group_fn is None
                    else (lambda names, h: group_fn(p, data, names, h)))
            if remat == "mlp":
                lins = _attention_kept(lins)
            x = block(cfg, p, x, masks.layer(w), pos_BT, inv_freq, lins, dtype)
            return constrain(x, ("rows", "length", "act_embed")), None

        if remat:   # rematerialise the blocks in the backward (ops.layer_remat)
            # inside a scan's loop XLA cannot merge the recomputation with the forward; an
            # unrolled scan (the plans' FLOP counts) needs the barriers that prevent it
            body = jax.checkpoint(body, prevent_cse=unroll_layers(), policy=(
                jax.checkpoint_policies.nothing_saveable if remat == "full"
                else jax.checkpoint_policies.save_only_these_names(KEPT)))
        x, _ = jax.lax.scan(body, self.embed(ids_BT, dtype),
                            (self.layers.layer_arrays(), keys, layer_data, masks.which),
                            unroll=unroll_layers())
        return x

    # -- what the packed influence engine needs (influence.engines.packed) --------------
    def packed_lora(self) -> dict[str, tuple[int, int, int, float]]:
        """{linear map: (d_in, rank, d_out, scale)} of the maps that carry LoRA."""
        return {n: (lin.lora_a.shape[1], lin.lora_a.shape[2], lin.lora_b.shape[2],
                    float(lin.lora_scale))
                for n, lin in self.layers.linears().items() if lin.lora_a is not None}

    def next_token_nll(self, x_BTD: jax.Array, ids_BT: jax.Array) -> jax.Array:
        """-log p(ids[t+1] | ids[<=t]) at every position t -> [B, T] (float32; the last
        position has no next token and gets a dummy target: weight it 0).

        logsumexp minus the target logit; the target logit is a row gather of the output
        matrix (its backward is a dense product, not a scatter into [B, T, V]), and the
        logits are never sliced (a copy of [B, T, V]).
        """
        nxt = jnp.concatenate([ids_BT[:, 1:], ids_BT[:, :1]], axis=1)
        lse = jax.nn.logsumexp(self.head(x_BTD).astype(jnp.float32), axis=-1)
        h = rms_norm(x_BTD, self.norm[...], self.cfg.rms_norm_eps, self.cfg.norm_offset)
        w = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...].T
        tgt = jnp.einsum("btd,btd->bt", h.astype(jnp.float32),
                         jnp.take(w, nxt, axis=0).astype(jnp.float32))
        return lse - self.softcap(tgt)

    def __call__(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                 dropout_key=None, dtype=None) -> jax.Array:
        return self.head(self.hidden_states(ids_BT, mask_BT, positions_BT=positions_BT,
                                            segments_BT=segments_BT, dropout_key=dropout_key,
                                            dtype=dtype))
