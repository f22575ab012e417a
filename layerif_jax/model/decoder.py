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

import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LINEARS, ModelConfig

NEG_INF = -1e30
# which activation feeds each linear map (q, k, v share the attention input)
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}  # finite: a fully masked (padding) query row must not give NaN


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


def precision():
    """Full float32 for the influence sums: HIGHEST on GPU/TPU (no TF32 or bf16 passes);
    on CPU float32 dots are exact already and HIGHEST only selects a slower kernel."""
    return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x[..., I] @ w[I, O] as one 2-D GEMM, accumulated in float32, cast back to x's dtype.

    2-D: XLA:CPU runs [B, T, I] @ [I, O] about 40% slower. float32 accumulation: a
    bfloat16 GEMM with a float32 result runs at twice the speed of a bfloat16 one
    there (AVX512-BF16), and is more accurate.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[-1])


def _fold(kernel, a, b, scale: float, dtype) -> jax.Array:
    w = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    # materialise W + sAB once: fused into the GEMM it would be recomputed per tile
    return jax.lax.optimization_barrier(w).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def folded_linear(x, kernel, a, b, scale: float, dtype) -> jax.Array:
    """x (W + s A B): one GEMM. Differentiable with respect to x ONLY (the influence
    taps path never needs the weights' gradient; their cotangents are zero).

    The custom VJP keeps (W, A, B) -- slices of the stacked parameters, which the
    layer scan forwards without a copy -- and recomputes W + sAB in the backward,
    instead of saving the folded matrix as a residual that the scan would stack
    (zero-filled, copied and read back: 14 MB per SmolLM2 block per chunk).
    """
    return mm(x, _fold(kernel, a, b, scale, dtype))


def _folded_fwd(x, kernel, a, b, scale, dtype):
    return folded_linear(x, kernel, a, b, scale, dtype), (kernel, a, b)


def _folded_bwd(scale, dtype, res, dy):
    kernel, a, b = res
    dx = mm(dy, _fold(kernel, a, b, scale, dtype).T)
    return dx, jnp.zeros_like(kernel), jnp.zeros_like(a), jnp.zeros_like(b)


folded_linear.defvjp(_folded_fwd, _folded_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def probed_linears(x, params, probes, onehot_RJT, scales: tuple, dtype) -> tuple:
    """The LoRA maps that share the input x [R, T, I] (q, k, v or gate, up), as ONE
    GEMM against the concatenated folded kernels [W_m + s_m A_m B_m]: a tuple of y_m.

    params: ((W, A, B), ...) per map; probes: ((pA [R*J, I, r], pB [R*J, r, O]), ...),
    ZEROS. The probes stand for per-example offsets of each map's LoRA factors
    (A + pA_e, B + pB_e for the tokens of example e = (row, j); onehot_RJT says
    which tokens those are), so the gradient with respect to them at zero is the
    per-example LoRA gradient, and the backward computes it right there, per layer,
    from x and dy = dL/dy:

        dL_e/dB = s * sum_{t in e} (x_t A)^T dy_t,    dL_e/dA = s * sum_{t in e} x_t^T (dy_t B^T)

    The forward ignores the probes' values (it is only differentiated at zero), and
    the cotangents of W, A and B are zeros: the path is differentiable with respect
    to x and the probes only. Saved for the backward: x and the parameter slices
    (which the layer scan forwards without a copy), never dy or a folded matrix.
    """
    return _probed_fwd(x, params, probes, onehot_RJT, scales, dtype)[0]


def _folded_cat(params, scales, dtype):
    return jnp.concatenate([_fold(k, a, b, s, dtype) for (k, a, b), s in zip(params, scales)], 1)


def _probed_fwd(x, params, probes, onehot_RJT, scales, dtype):
    y = mm(x, _folded_cat(params, scales, dtype))
    sizes = [k.shape[-1] for k, _, _ in params]
    ys = tuple(jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1))
    return ys, (x, params, onehot_RJT)


def _probed_bwd(scales, dtype, res, dys):
    x, params, oh = res
    dx = mm(jnp.concatenate([dy.astype(dtype) for dy in dys], -1),
            _folded_cat(params, scales, dtype).T)
    prec = precision()
    R, J, T = oh.shape
    xf = x.astype(jnp.float32)
    g_probes = []
    for (_, a, b), s, dy in zip(params, scales, dys):
        dyf = dy.astype(jnp.float32)
        u = jnp.einsum("rti,ik->rtk", xf, a.astype(jnp.float32), precision=prec)
        du = s * jnp.einsum("rto,ko->rtk", dyf, b.astype(jnp.float32), precision=prec)
        # masks on the skinny (rank-r) side, then one contraction over the row's tokens
        gA = jnp.einsum("rjtk,rti->rjik", oh[..., None] * du[:, None], xf, precision=prec)
        gB = s * jnp.einsum("rjtk,rto->rjko", oh[..., None] * u[:, None], dyf, precision=prec)
        g_probes.append((gA.reshape(R * J, *gA.shape[2:]), gB.reshape(R * J, *gB.shape[2:])))
    zeros = jax.tree.map(jnp.zeros_like, params)
    return dx, zeros, tuple(g_probes), jnp.zeros_like(oh)


probed_linears.defvjp(_probed_fwd, _probed_bwd)


def linear_apply(p: dict[str, jax.Array], x: jax.Array, *, scale: float, dropout: float,
                 key: jax.Array | None, dtype, tap: jax.Array | None = None) -> jax.Array:
    """One layer's slice of a StackedLinear: x[..., I] -> y[..., O].

    With `tap` (zeros shaped like y) the LoRA is folded into the kernel,
    y = x (W + s A B) + tap: the same function, one GEMM instead of two skinny
    ones, and the gradient with respect to the tap is dL/dy, from which the
    per-example LoRA gradients follow (influence/packed.py). Dropout is off there.
    """
    if tap is not None:
        if "lora_a" in p:
            y = folded_linear(x, p["kernel"], p["lora_a"], p["lora_b"], scale, dtype)
        else:
            y = mm(x, p["kernel"].astype(dtype))
        if "bias" in p:
            y = y + p["bias"].astype(dtype)
        return y + tap.astype(y.dtype)
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


def attention(q_BTHD, k_BTKD, v_BTKD, bias, dtype) -> jax.Array:
    """Grouped-query attention -> [B, T, H*D]. Softmax in float32.

    Laid out as plain batched matmuls over (batch, kv-head): [B*K, G*T, D] x [B*K, D, S];
    XLA:CPU runs this about twice as fast as the equivalent 5-D einsum.
    """
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, D)
    k = k_BTKD.transpose(0, 2, 3, 1).reshape(B * K, D, T)
    v = v_BTKD.transpose(0, 2, 1, 3).reshape(B * K, T, D)
    s = jnp.matmul(q, k, preferred_element_type=jnp.float32)
    # the softmax runs in the matmul's layout, so that under autodiff its output is ONE
    # residual (shared by the softmax and the w @ v backward), not two copies
    bias = jnp.broadcast_to(bias, (B, K, G, T, T)).reshape(B * K, G * T, T)
    w = softmax_last(s * (1.0 / math.sqrt(D)) + bias).astype(dtype)
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


def block_apply(cfg: ModelConfig, p: dict[str, Any], x_BTD: jax.Array, bias, pos_BT, inv_freq,
                *, lora: dict[str, tuple[float, float]], key: jax.Array | None, dtype,
                taps: dict[str, jax.Array] | None = None,
                probes: dict[str, tuple[jax.Array, jax.Array]] | None = None,
                probe_onehot: jax.Array | None = None):
    """One decoder block. `p` holds this layer's slice of every stacked parameter.

    With `taps` ({module: zeros [B, T, d_out]}) it returns (x, {input: x_in}), the
    inputs of the linear maps keyed by INPUT_OF (q, k and v share one input).
    With `probes` ({LoRA module: zero (pA, pB)}, see `probed_linears`) the LoRA maps
    that share an input run as one folded GEMM whose backward yields per-example
    LoRA gradients as the probes' cotangents.
    """
    keys = dict(zip(LINEARS, jax.random.split(key, len(LINEARS)))) if key is not None else {}
    recorded = {}
    groups: dict[str, dict[str, jax.Array]] = {}

    def lin(name, h):
        if probes is not None and name in probes:
            group = INPUT_OF[name]
            if group not in groups:  # q asks first: compute q, k and v together
                members = [n for n in LINEARS if INPUT_OF[n] == group and n in probes]
                ys = probed_linears(
                    h, tuple((p[n]["kernel"], p[n]["lora_a"], p[n]["lora_b"]) for n in members),
                    tuple(probes[n] for n in members), probe_onehot,
                    tuple(lora[n][0] for n in members), dtype)
                groups[group] = dict(zip(members, ys))
            y = groups[group][name]
            return y + p[name]["bias"].astype(y.dtype) if "bias" in p[name] else y
        scale, drop = lora.get(name, (0.0, 0.0))
        tap = None if taps is None else taps.get(name)
        out = linear_apply(p[name], h, scale=scale, dropout=drop, key=keys.get(name),
                           dtype=dtype, tap=tap)
        if tap is not None:
            recorded[INPUT_OF[name]] = h
        return out

    x_BTD = block_body(cfg, p, x_BTD, bias, pos_BT, inv_freq, lin, dtype)
    return x_BTD if taps is None else (x_BTD, recorded)


def block_body(cfg: ModelConfig, p: dict[str, Any], x_BTD: jax.Array, bias, pos_BT, inv_freq,
               lin, dtype) -> jax.Array:
    """Attention + MLP of one block; `lin(name, h)` applies linear map `name` to h
    (plain/LoRA here, MoE-LoRA in moe.py)."""
    B, T, _ = x_BTD.shape
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = rms_norm(x_BTD, p["input_layernorm"], cfg.rms_norm_eps, cfg.norm_offset)
    q = apply_rope(lin("q_proj", h).reshape(B, T, H, hd), pos_BT, inv_freq)
    k = apply_rope(lin("k_proj", h).reshape(B, T, K, hd), pos_BT, inv_freq)
    v = lin("v_proj", h).reshape(B, T, K, hd)
    o = attention(q, k, v, bias, dtype)
    x_BTD = x_BTD + lin("o_proj", o)
    h = rms_norm(x_BTD, p["post_attention_layernorm"], cfg.rms_norm_eps, cfg.norm_offset)
    m = glu(cfg.hidden_act, lin("gate_proj", h), lin("up_proj", h))
    return x_BTD + lin("down_proj", m)


class Blocks(nnx.Module):
    """All L decoder blocks, every parameter stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        L = cfg.num_layers
        for name in LINEARS:
            d_in, d_out = cfg.linear_shape(name)
            setattr(self, name, StackedLinear(L, d_in, d_out, bias=cfg.has_bias(name),
                                              dtype=dtype, rngs=rngs))
        init_w = 0.0 if cfg.norm_offset else 1.0
        self.input_layernorm = nnx.Param(jnp.full((L, cfg.hidden_size), init_w, dtype))
        self.post_attention_layernorm = nnx.Param(jnp.full((L, cfg.hidden_size), init_w, dtype))

    def linears(self) -> dict[str, StackedLinear]:
        return {n: getattr(self, n) for n in LINEARS}

    def layer_arrays(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: lin.layer_arrays() for n, lin in self.linears().items()}
        out["input_layernorm"] = self.input_layernorm[...]
        out["post_attention_layernorm"] = self.post_attention_layernorm[...]
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
        return out.reshape(B, T, -1)

    def hidden_states(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                      dropout_key=None, dtype=None, taps=None, probes=None, probe_onehot=None):
        """Final hidden states (before the last norm).

        segments_BT: packed rows (attention stays inside a segment; pass positions
        that restart per segment). taps: {module: zeros [L, B, T, d_out]}; then LoRA
        is folded into the kernels and the result is (x, {input: x_in [L, B, T, d_in]})
        with inputs keyed by INPUT_OF. That path is differentiable with respect to the
        taps (and activations) only, not the weights (see `folded_linear`).
        probes: {LoRA module: zero (pA [L, R*J, I, r], pB [L, R*J, r, O])} with
        probe_onehot [R, J, T] (token t of row r belongs to example j of the row): the
        gradient with respect to the probes is the per-example LoRA gradient (see
        `probed_linears`); differentiable with respect to the probes only.
        """
        cfg = self.cfg
        dtype = dtype or self.dtype
        B, T = ids_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
        bias = attention_bias(mask_BT, pos_BT, cfg.sliding_window, segments_BT)
        inv_freq = rope_inv_freq(cfg)
        lora = self.layers.lora_settings()
        stacked = self.layers.layer_arrays()
        keys = (jax.random.split(dropout_key, cfg.num_layers) if dropout_key is not None
                else None)

        def body(x, xs):
            p, key, tap, probe = xs
            out = block_apply(cfg, p, x, bias, pos_BT, inv_freq, lora=lora, key=key,
                              dtype=dtype, taps=tap, probes=probe, probe_onehot=probe_onehot)
            return (out, None) if tap is None else out

        x, recorded = jax.lax.scan(body, self.embed(ids_BT, dtype), (stacked, keys, taps, probes))
        return x if taps is None else (x, recorded)

    def __call__(self, ids_BT, mask_BT=None, *, positions_BT=None, segments_BT=None,
                 dropout_key=None, dtype=None) -> jax.Array:
        return self.head(self.hidden_states(ids_BT, mask_BT, positions_BT=positions_BT,
                                            segments_BT=segments_BT, dropout_key=dropout_key,
                                            dtype=dtype))
