"""MoE adapters on disk (safetensors + moe_config.json) and allocation files."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...errors import LayerIFError
from ...models.lora import normalize_targets
from .model import MoELoraModel, check_experts, resolve_top_k

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FORMAT", "ADAPTER_DIR",
           "read_allocation", "save_moe_adapter", "load_moe_adapter"]

ADAPTER_CONFIG = "moe_config.json"


ADAPTER_WEIGHTS = "moe_adapter.safetensors"


ADAPTER_FORMAT = "layerif_jax_moe"


ADAPTER_DIR = "adapter"  # as train.ADAPTER_DIR: train_moe output dirs look like finetune's


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
    from ...formats.safetensors import SafetensorsFile
    from ...io import read_json

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
