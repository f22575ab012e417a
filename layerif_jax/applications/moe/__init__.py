"""LoRA-MoE (MoLA style) with a per-layer number of experts (METHOD.md section 4).

For every target linear map of block l there are s_l LoRA experts (A_j [d_in, r],
Gaussian init std 1/r as peft's "gaussian"; B_j [r, d_out] zero), typed
`nnx.LoRAParam`, and a bias-free router W_r [d_in, s_l] typed `RouterParam` (a subclass
of `nnx.Param`, so `nnx.split(m, (nnx.LoRAParam, RouterParam), ...)` — `TRAINABLE` —
separates the trained parameters from the frozen base):

    p   = softmax(x W_r)                      (float32)
    top = the top-k entries of p, renormalised to sum to 1 (k = 2 if s_l > 1 else 1)
    y   = x W0 + sum_{j in top} p_j (alpha/r) (x A_j) B_j

Layers differ in expert count, so the model is not homogeneous and cannot be one
`lax.scan` over stacked blocks like `Decoder`: the blocks run in a Python loop (unrolled
under jit; compile time grows with depth), each from its slice of the base's stacked
arrays, reusing the decoder's helpers.

Expert computation — DENSE over the layer's experts, two GEMMs, no loop:
    U = x [N, d_in] @ A_cat [d_in, s*r]                  (all s expert projections)
    U <- U * (scale * G)  broadcast per (token, expert)  (G [N, s]: the renormalised
                                                          top-k gates, 0 outside top-k)
    delta = U [N, s*r] @ B_cat [s*r, d_out]              (weighted sum over experts is
                                                          the contraction over s*r)
Why: it is exact (the experts outside the top-k get weight exactly 0), it costs the same
as ONE LoRA of rank s*r (s*r is 8..64 against d ~ 500..4096: a few percent of the base
GEMM), it has static shapes and no gather/scatter or token sorting (which on these
sizes costs more than the FLOPs it saves, and is awkward to differentiate), and the
router gradient flows through `lax.top_k`'s values. Gather-based routing (megablocks
style) would only pay off when s*r approaches d.

Optional Switch-style load-balancing loss (coefficient `aux_coef`, default 0 = off):
per MoE linear with s > 1, s * sum_j f_j P_j over real (unmasked) tokens, f_j = share of
top-k slots routed to j, P_j = mean router probability; averaged over those linears.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ... import dtypes
from ...data import Example, epoch_batches
from ...errors import LayerIFError
from ...loss import example_losses
from ...models.config import LINEARS
from ...models.decoder import attention_bias, block_fn, linear_apply, rope_inv_freq
from ...ops import mm
from ...models.lora import normalize_targets

ADAPTER_CONFIG = "moe_config.json"
ADAPTER_WEIGHTS = "moe_adapter.safetensors"
ADAPTER_FORMAT = "layerif_jax_moe"
ADAPTER_DIR = "adapter"  # as train.ADAPTER_DIR: train_moe output dirs look like finetune's


class RouterParam(nnx.Param):
    """A router matrix W_r [d_in, s]; trained together with the experts (not frozen)."""


TRAINABLE = (nnx.LoRAParam, RouterParam)  # an "any of" filter: experts and routers


# -- configuration --------------------------------------------------------------------------

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


def read_allocation(path, num_layers: int, top_k=None, method: str | None = None):
    """(experts, top_k) from an allocation JSON: `layerif allocate experts --out` (key
    'experts', optional 'total' and 'top_k'), `layerif run`'s report/allocation.json
    ('experts' per method: pick one with `method`), or a plain JSON list. Wrong layer
    count, sum != total, counts < 1, or top-k > a layer's experts -> LayerIFError."""
    from ...io import read_json

    obj = read_json(path)
    saved_k = None
    if isinstance(obj, dict):
        if "experts" not in obj:
            raise LayerIFError(f"{path}: no 'experts' key (expected `layerif allocate experts` "
                               "or `layerif run` output)")
        experts, total, saved_k = obj["experts"], obj.get("total"), obj.get("top_k")
        if isinstance(experts, dict):  # `layerif run`: one allocation per method
            if method is None or method not in experts:
                raise LayerIFError(f"{path} holds the allocations {', '.join(experts)}: pick "
                                   "one with --allocation"
                                   + (f" ({method!r} is not one of them)" if method else ""))
            experts = experts[method]
            saved_k = (saved_k or {}).get(method) if isinstance(saved_k, dict) else None
    elif isinstance(obj, list):
        experts, total = obj, None
    else:
        raise LayerIFError(f"{path}: expected a JSON object with 'experts' or a JSON list")
    if not isinstance(experts, list):
        raise LayerIFError(f"{path}: 'experts' must be a list of integers")
    counts = check_experts(experts, num_layers)
    if total is not None and sum(counts) != int(total):
        raise LayerIFError(f"{path}: expert counts sum to {sum(counts)} but 'total' is {total}")
    return counts, resolve_top_k(counts, top_k if top_k is not None else saved_k)


# -- the MoE linear map -----------------------------------------------------------------------

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


# -- adapter I/O ------------------------------------------------------------------------------

def _tensor_name(layer: int, name: str, what: str) -> str:
    return f"layers.{layer}.{name}.{what}"


def save_moe_adapter(model: MoELoraModel, out_dir: str | Path, base_model_name: str = "",
                     *, overwrite: bool = False) -> Path:
    """out_dir/moe_adapter.safetensors (float32: layers.{l}.{name}.{experts_a [s, d_in, r],
    experts_b [s, r, d_out], router [d_in, s]}, finite, with checksums) +
    out_dir/moe_config.json (expert counts, top_k, rank, alpha, targets), committed as
    `io.OutputDir` does."""
    from ...formats import safetensors as safetensors_io
    from ...io import OutputDir, write_json

    tensors = {}
    for l, blk in enumerate(model.blocks):
        for name in model.targets:
            m = blk.get(name)
            for what, var in (("experts_a", m.lora_a), ("experts_b", m.lora_b),
                              ("router", m.router)):
                tensors[_tensor_name(l, name, what)] = np.ascontiguousarray(
                    np.asarray(jax.device_get(var[...]), np.float32))
    meta = {"format": ADAPTER_FORMAT, "version": 1, "num_layers": model.cfg.num_layers,
            "hidden_size": model.cfg.hidden_size, "model_type": model.cfg.model_type,
            "base_model": base_model_name or None, **model.spec()}
    out_dir = Path(out_dir)
    with OutputDir(out_dir, "save moe adapter", overwrite=overwrite) as out, \
            out.staging() as tmp:
        safetensors_io.write(tmp / ADAPTER_WEIGHTS, tensors)
        write_json(tmp / ADAPTER_CONFIG, meta)
    return out_dir


def _adapter_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return p
    if (p / ADAPTER_DIR / ADAPTER_CONFIG).is_file():  # a `train_moe` output dir
        return p / ADAPTER_DIR
    raise LayerIFError(f"{p}: no MoE adapter ({ADAPTER_CONFIG} not found)")


def load_moe_adapter(model, adapter_dir: str | Path, *, top_k=None) -> MoELoraModel:
    """Load a `save_moe_adapter` dir. `model`: a base `Decoder` (a new MoELoraModel is built
    around it) or a MoELoraModel (loaded in place; its spec must match). Expert counts
    that do not fit the model's layers, or tensors whose shapes disagree -> LayerIFError."""
    from ...io import read_json
    from ...formats.safetensors import SafetensorsFile

    d = _adapter_dir(adapter_dir)
    meta = read_json(d / ADAPTER_CONFIG)
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise LayerIFError(f"{d / ADAPTER_CONFIG}: not a layerif_jax MoE adapter config")
    try:
        experts = [int(s) for s in meta["experts"]]
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        targets = tuple(meta["targets"])
        saved_k = meta.get("top_k")
    except (KeyError, TypeError, ValueError) as e:
        raise LayerIFError(f"{d / ADAPTER_CONFIG}: missing or bad field ({e})") from None
    base = model.base if isinstance(model, MoELoraModel) else model
    L = base.cfg.num_layers
    if len(experts) != L:
        raise LayerIFError(f"adapter {d} has expert counts for {len(experts)} layers "
                           f"({' '.join(map(str, experts))}) but the model has {L} layers")
    if meta.get("hidden_size") not in (None, base.cfg.hidden_size):
        raise LayerIFError(f"adapter {d} was trained on hidden size {meta['hidden_size']}, "
                           f"the model has {base.cfg.hidden_size}")
    k = top_k if top_k is not None else saved_k
    if isinstance(model, MoELoraModel):
        if list(model.experts) != experts:
            raise LayerIFError(f"adapter {d} expert counts {experts} do not match the model's "
                               f"{list(model.experts)}")
        if (model.rank, tuple(model.targets)) != (rank, normalize_targets(targets)):
            raise LayerIFError(f"adapter {d} (rank {rank}, targets {list(targets)}) does not "
                               f"match the model (rank {model.rank}, targets {list(model.targets)})")
        moe = model
    else:
        moe = MoELoraModel(base, experts, rank=rank, alpha=alpha, targets=targets, top_k=k,
                           rngs=nnx.Rngs(0))
    tensors = SafetensorsFile(d / ADAPTER_WEIGHTS).read_all()
    for l, blk in enumerate(moe.blocks):
        for name in moe.targets:
            m = blk.get(name)
            for what, var in (("experts_a", m.lora_a), ("experts_b", m.lora_b),
                              ("router", m.router)):
                key = _tensor_name(l, name, what)
                if key not in tensors:
                    raise LayerIFError(f"{d / ADAPTER_WEIGHTS} lacks tensor {key}")
                arr = tensors[key]
                if arr.shape != var[...].shape:
                    raise LayerIFError(
                        f"{d / ADAPTER_WEIGHTS}: {key} has shape {arr.shape}, the model expects "
                        f"{var[...].shape} (expert counts do not match the model's layers)")
                var[...] = jnp.asarray(arr, var[...].dtype)
    return moe


# -- training ----------------------------------------------------------------------------------

def split_moe(model: MoELoraModel):
    """(graphdef, trainable state = experts + routers, frozen rest)."""
    if not isinstance(model, MoELoraModel):
        raise LayerIFError("train_moe needs a MoELoraModel")
    return nnx.split(model, TRAINABLE, ...)


def _moe_loss_sum(graphdef, train, rest, ids, mask, targets, index, *, dtype, aux_coef):
    """Objective summed over real rows (+ aux_coef * balance loss * real rows) and stats."""
    model = nnx.merge(graphdef, train, rest)
    logits, aux = model(ids, mask, dtype=dtypes.jnp_dtype(dtype), return_aux=True)
    per = example_losses(logits, ids, targets)
    real = index >= 0
    n = jnp.sum(real).astype(jnp.float32)
    lsum = jnp.sum(jnp.where(real, per, 0.0))
    obj = lsum + aux_coef * aux * n if aux_coef else lsum
    return obj, (lsum, aux * n, n)


def _moe_step_impl(train, opt_state, rest, ids, mask, targets, index, *, graphdef, opt_spec,
                   dtype, aux_coef):
    from ...training import accumulate, optimizer_of, tree_norm

    tx = optimizer_of(*opt_spec)
    gsum, (lsum, asum, _) = accumulate(
        lambda t, *xs: _moe_loss_sum(graphdef, t, rest, *xs, dtype=dtype, aux_coef=aux_coef),
        train, (ids, mask, targets, index))
    n = jnp.sum(index >= 0)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, gsum)
    updates, opt_state = tx.update(grads, opt_state, train)
    train = optax.apply_updates(train, updates)
    return train, opt_state, {"loss": lsum / denom, "aux": asum / denom,
                              "grad_norm": tree_norm(grads), "rows": n}


moe_train_step = jax.jit(_moe_step_impl,
                         static_argnames=("graphdef", "opt_spec", "dtype", "aux_coef"))


def _moe_eval_impl(train, rest, ids, mask, targets, index, *, graphdef, dtype):
    return _moe_loss_sum(graphdef, train, rest, ids, mask, targets, index, dtype=dtype,
                         aux_coef=0.0)[1]


moe_eval_sums = jax.jit(_moe_eval_impl, static_argnames=("graphdef", "dtype"))


def moe_validation_loss(model: MoELoraModel, examples: Sequence[Example], cfg=None,
                        pad_id: int = 0) -> float:
    """Mean per-example loss on `examples` (no balance loss)."""
    from ...training import TrainConfig, fit_examples, pad_length
    cfg = cfg or TrainConfig()
    ex = fit_examples(examples, cfg.max_len, "validation")
    graphdef, train, rest = split_moe(model)
    return _evaluate(graphdef, train, rest, ex, cfg, pad_length(ex, cfg.max_len), pad_id)


def _evaluate(graphdef, train, rest, examples, cfg, length, pad_id):
    total, n = 0.0, 0
    for batch in epoch_batches(examples, cfg.batch_size, seed=0, epoch=0, max_len=length,
                               pad_id=pad_id, shuffle=False):
        s, _, k = moe_eval_sums(train, rest, batch.ids, batch.mask, batch.targets, batch.index,
                                graphdef=graphdef, dtype=cfg.compute_dtype)
        total += float(s)
        n += int(k)
    return total / max(n, 1)


def train_moe(moe_model: MoELoraModel, train_examples: Sequence[Example], out_dir,
              cfg=None, *, val_examples: Sequence[Example] | None = None,
              max_steps: int | None = None, aux_coef: float = 0.0, progress: bool = False,
              pad_id: int = 0, base_model_name: str = "", overwrite: bool = False
              ) -> dict[str, Any]:
    """Train the experts and routers of `moe_model` (in place); the base stays frozen.

    AdamW on `train.make_schedule` (linear warm-up, then linear decay to 0), global-norm
    clipping (cfg.max_grad_norm), gradient accumulation as a scan inside one jitted step
    (the loss of a step is the mean over the real rows of the effective batch). Data order
    depends on (seed, epoch) only, so an orbax checkpoint at step s (out_dir/checkpoints:
    trainable state, AdamW state, history, checksums) resumes to the uninterrupted
    trajectory when its fingerprint (settings, data, base weights, initial experts)
    matches. `out_dir`: a path or an open `io.OutputDir`. `max_steps` stops early (with a
    checkpoint) without changing the schedule. On completion commits out_dir/adapter
    (`save_moe_adapter`), history.json, train_state.json.
    """
    from ...training import (TrainConfig, cast_like, opt_spec, optimizer_of, pad_length,
                        finish_run, float32_master, prepare_run, run_dir, run_fingerprint,
                        train_loop)

    cfg = cfg or TrainConfig()
    run = prepare_run(train_examples, val_examples, cfg, max_steps)
    tr, val, T_val, total = run.train, run.val, run.val_length, run.total_steps
    if not (isinstance(aux_coef, (int, float)) and math.isfinite(aux_coef) and aux_coef >= 0):
        raise LayerIFError(f"aux_coef must be >= 0, got {aux_coef!r}")
    aux_coef = float(aux_coef)
    graphdef, train, rest = split_moe(moe_model)
    train, orig_dtypes = float32_master(train)
    spec = opt_spec(cfg, total)
    fp = run_fingerprint(cfg, tr, total, model_config=moe_model.cfg, base=rest, init=train,
                         moe=moe_model.spec(), aux_coef=aux_coef)

    def step_fn(train, opt_state, ids, mask, tgt, idx, step):
        return moe_train_step(train, opt_state, rest, ids, mask, tgt, idx, graphdef=graphdef,
                              opt_spec=spec, dtype=cfg.compute_dtype, aux_coef=aux_coef)

    with run_dir(out_dir, "moe train", overwrite) as out:
        res = train_loop(
            train, optimizer_of(*spec).init(train), step_fn, cfg=cfg, train=tr,
            out_dir=out.path, fingerprint=fp, state_key="train",
            stats_keys={"train_loss": "loss", "aux_loss": "aux", "grad_norm": "grad_norm"},
            val_loss=((lambda p: _evaluate(graphdef, p, rest, val, cfg, T_val, pad_id))
                      if val else None),
            max_steps=max_steps, progress=progress, pad_id=pad_id, desc="moe")
        nnx.update(moe_model, cast_like(res.params, orig_dtypes))
        finish_run(out, res.history, {
            "config": dataclasses.asdict(cfg), "moe": moe_model.spec(), "aux_coef": aux_coef,
            "n_train": len(tr), "n_val": len(val) if val else 0,
            "padded_length": pad_length(tr, cfg.max_len),
            "base_model": base_model_name or None},
            lambda p: save_moe_adapter(moe_model, p, base_model_name=base_model_name))
    return res.history
