"""The Hugging Face <-> layerif_jax parameter map, as data.

Each row maps an HF tensor name pattern to a path in the NNX model, whether the
tensor is per layer (stacked on the leading axis) and whether it is transposed
(torch Linear stores [out, in]; we store [in, out]).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import dtypes
from ..errors import LayerIFError
from ..stop import check as check_stop
from .config import LINEARS, ModelConfig
from .decoder import Decoder

_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def hf_table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool, bool]]:
    """Rows (hf_name_with_{l}, nnx_path, per_layer, transpose): the shared keys, and the
    per-block norms the family declares (`Family.norms`, `Family.head_norms`)."""
    rows = [("model.embed_tokens.weight", ("embed_tokens",), False, False),
            ("model.norm.weight", ("norm",), False, False)]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), False, True))
    for name in LINEARS:
        sub = "self_attn" if name in _ATTN else "mlp"
        rows.append((f"model.layers.{{l}}.{sub}.{name}.weight", ("layers", name, "kernel"), True, True))
        if cfg.has_bias(name):
            rows.append((f"model.layers.{{l}}.{sub}.{name}.bias", ("layers", name, "bias"), True, False))
    fam = cfg.family
    for norm in fam.norms:
        rows.append((f"model.layers.{{l}}.{norm}.weight", ("layers", norm), True, False))
    for norm in fam.head_norms:
        rows.append((f"model.layers.{{l}}.self_attn.{norm}.weight", ("layers", norm), True, False))
    return rows


def get_var(model, path) -> nnx.Variable:
    """The Variable at an attribute path of the model (a row of `hf_table`)."""
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


class _Fit:
    """The checkpoint's keys against the model's table: the rows whose keys are all
    there, and every missing, mismatched and unexpected key, reported in ONE error."""

    def __init__(self, cfg: ModelConfig, abstract, names: Iterable[str], source: str):
        self.cfg, self.source, self.names = cfg, source, set(names)
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.used: set[str] = set()
        self.rows = []   # (path, keys, per_layer, transpose, shape)
        for pattern, path, per_layer, transpose in hf_table(cfg):
            keys = [pattern.format(l=l) for l in (range(cfg.num_layers) if per_layer
                                                  else [None])]
            self.used.update(k for k in keys if k in self.names)
            if any(k not in self.names for k in keys):
                self.missing += [k for k in keys if k not in self.names]
                continue
            self.rows.append((path, keys, per_layer, transpose,
                              tuple(get_var(abstract, path).shape)))

    def check(self, key: str, got: tuple, want: tuple) -> bool:
        """Whether the checkpoint's (transposed) `got` is the model's `want` (noted if not)."""
        if tuple(got) == tuple(want):
            return True
        self.mismatched.append(f"{key}: checkpoint {tuple(got)}, model expects {tuple(want)}")
        return False

    def raise_misfits(self) -> None:
        cfg = self.cfg
        unexpected = sorted(n for n in self.names - self.used
                            if not n.endswith("rotary_emb.inv_freq")
                            and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
        if self.missing or self.mismatched or unexpected:
            raise LayerIFError(_fit_report(cfg, self.source, self.names, self.missing,
                                           self.mismatched, unexpected))


def model_from_tensors(cfg: ModelConfig, names: Iterable[str],
                       get: Callable[[str], np.ndarray], *, dtype=jnp.float32,
                       source: str = "checkpoint") -> Decoder:
    """Build the abstract model with `nnx.eval_shape`, then fill it tensor by tensor.

    Every missing key, shape mismatch and unexpected key is collected first and
    reported in one error. Only one stacked parameter is staged on the host at a time.
    """
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    fit = _Fit(cfg, abstract, names, source)
    npdt = dtypes.numpy_dtype(dtype)
    fills: list[tuple[tuple[str, ...], np.ndarray]] = []
    for path, keys, per_layer, transpose, want in fit.rows:
        buf = np.empty(want, npdt)
        for i, k in enumerate(keys):
            check_stop()  # a long load stops between two tensors on SIGINT / SIGTERM
            t = get(k)
            t = t.T if transpose else t
            slot = buf[i] if per_layer else buf
            if fit.check(k, t.shape, slot.shape):
                slot[...] = t.astype(npdt)
        fills.append((path, buf))
    fit.raise_misfits()
    for path, buf in fills:
        get_var(abstract, path).set_value(jnp.asarray(buf))
    abstract.lora_config = None
    return abstract


def sharded_model_from_tensors(cfg: ModelConfig, names: Iterable[str],
                               shape_of: Callable[[str], tuple],
                               get_slice: Callable[[str, tuple], np.ndarray], *, mesh,
                               sharding: str, dtype=jnp.float32,
                               source: str = "checkpoint") -> Decoder:
    """The model straight into its shards: every parameter laid out on `mesh` as the
    `sharding` preset says (`layerif_jax.sharding`), each process reading only the slices
    of the tensors its own devices hold (`get_slice(name, index)`, e.g. a memory map),
    never a whole tensor it does not own. Shapes are checked from the headers first
    (`shape_of`), every misfit reported in one error, as `model_from_tensors` does."""
    from .. import sharding as shd

    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    fit = _Fit(cfg, abstract, names, source)
    npdt = dtypes.numpy_dtype(dtype)
    for _, keys, per_layer, transpose, want in fit.rows:
        one = want[1:] if per_layer else want
        for k in keys:
            got = tuple(shape_of(k))
            fit.check(k, got[::-1] if transpose else got, one)
    fit.raise_misfits()
    for path, keys, per_layer, transpose, want in fit.rows:
        check_stop()
        sh = shd.sharding_of(".".join(path), want, mesh, sharding)

        def block(index, keys=keys, per_layer=per_layer, transpose=transpose, want=want):
            index = tuple(index) + (slice(None),) * (len(want) - len(index))
            layers = range(*index[0].indices(want[0])) if per_layer else [0]
            inner = index[1:] if per_layer else index
            parts = []
            for l in layers:
                t = get_slice(keys[l], inner[::-1] if transpose else inner)
                parts.append((t.T if transpose else t).astype(npdt))
            return np.stack(parts) if per_layer else parts[0]

        get_var(abstract, path).set_value(jax.make_array_from_callback(want, sh, block))
    abstract.lora_config = None
    return abstract


def _fit_report(cfg, source, names, missing, mismatched, unexpected) -> str:
    """One line: how many keys are missing / mismatched / unexpected, the first few of
    each, and the layer count the weights hold when it is not the config's."""
    import re

    held = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    parts = []
    if held and max(held) + 1 != cfg.num_layers:
        parts.append(f"config.json says {cfg.num_layers} layers, the weights hold "
                     f"{max(held) + 1}")
    for what, keys in (("missing", missing), ("shape mismatches", mismatched),
                       ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} keys ({'; '.join(keys[:3])}{more})"
                         if what != "shape mismatches" else
                         f"{len(keys)} shape mismatches ({'; '.join(keys[:3])}{more})")
    return f"{source} does not fit a {cfg.model_type} model: " + "; ".join(parts)


def model_to_tensors(model: Decoder, dtype=None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of the base model (LoRA ignored: merge it first)."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    for pattern, path, per_layer, transpose in hf_table(cfg):
        arr = np.asarray(jax.device_get(get_var(model, path)[...]))
        if dtype is not None:
            arr = arr.astype(dtypes.numpy_dtype(dtype))
        for l in (range(cfg.num_layers) if per_layer else [None]):
            t = arr[l] if per_layer else arr
            out[pattern.format(l=l)] = np.ascontiguousarray(t.T if transpose else t)
    return out
