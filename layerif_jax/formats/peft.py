"""LoRA adapters in the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors).

PEFT stores, for block l and linear map `name` (torch Linear, weight [out, in]):
    base_model.model.model.layers.{l}.self_attn.{name}.lora_A.weight   [r, d_in]  = our A[l].T
    base_model.model.model.layers.{l}.self_attn.{name}.lora_B.weight   [d_out, r] = our B[l].T
(`mlp` instead of `self_attn` for gate/up/down), scale lora_alpha / r. Loading also
accepts the in-memory forms `...lora_A.default.weight` and keys without the
`base_model.model.` prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import safetensors as safetensors_io
from ..errors import LayerIFError
from ..io import OutputDir, write_json
from ..models.config import LINEARS
from ..models.lora import ALIASES, LoraConfig, apply_lora, lora_config_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
                  r"(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _sub(name: str) -> str:
    return "self_attn" if name in _ATTN else "mlp"


def peft_key(layer: int, name: str, which: str) -> str:
    """The key PEFT's save_pretrained writes; which is "A" or "B"."""
    return f"base_model.model.model.layers.{layer}.{_sub(name)}.{name}.lora_{which}.weight"


def _num(x: float):
    x = float(x)
    return int(x) if x.is_integer() else x


def save_peft_adapter(model, out_dir: str | Path, base_model_name: str = "", *,
                      overwrite: bool = False) -> Path:
    """Write the model's LoRA as a PEFT adapter dir (float32 tensors, refused when not
    finite; their SHA-256 in the file's metadata). Returns the dir."""
    lcfg = lora_config_of(model)
    if lcfg is None:
        raise LayerIFError("the model has no LoRA adapter to save")
    out_dir = Path(out_dir)
    L = model.cfg.num_layers
    tensors: dict[str, np.ndarray] = {}
    for name in lcfg.targets:
        lin = model.layers.linears()[name]
        if lin.lora_a is None:
            raise LayerIFError(f"LoRA config targets {name} but the model has no adapter there")
        a = np.asarray(jax.device_get(lin.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(lin.lora_b[...]), np.float32)
        for l in range(L):
            tensors[peft_key(l, name, "A")] = np.ascontiguousarray(a[l].T)
            tensors[peft_key(l, name, "B")] = np.ascontiguousarray(b[l].T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or None,
        "revision": None,
        "r": int(lcfg.rank),
        "lora_alpha": _num(lcfg.alpha),
        "lora_dropout": float(lcfg.dropout),
        "target_modules": list(lcfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }
    with OutputDir(out_dir, "save adapter", overwrite=overwrite) as out, out.staging() as tmp:
        safetensors_io.write(tmp / WEIGHTS_NAME, tensors)
        write_json(tmp / CONFIG_NAME, config)
    return out_dir


# -- loading ---------------------------------------------------------------------------------

# adapter_config.json keys whose non-default (truthy) values we cannot honour
_UNSUPPORTED = {
    "use_rslora": "use_rslora (rank-stabilised scaling)",
    "use_dora": "use_dora (DoRA)",
    "layers_to_transform": "layers_to_transform",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias",
    "exclude_modules": "exclude_modules",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "alora_invocation_tokens (aLoRA)",
}


def _targets_of(tm, num_layers: int, src: str) -> tuple[str, ...]:
    """Our module names from PEFT's target_modules (list of names/suffixes, or a regex)."""
    if tm is None:
        raise LayerIFError(f"{src}: target_modules is missing")
    if isinstance(tm, str):
        if tm == "all-linear":
            return LINEARS
        if tm in LINEARS or tm in ALIASES:
            return (ALIASES.get(tm, tm),)
        try:
            pat = re.compile(tm)
        except re.error as e:
            raise LayerIFError(f"{src}: target_modules regex {tm!r} is invalid: {e}") from None
        out = []
        for name in LINEARS:
            hits = [bool(pat.fullmatch(f"model.layers.{l}.{_sub(name)}.{name}"))
                    for l in range(num_layers)]
            if all(hits):
                out.append(name)
            elif any(hits):
                raise LayerIFError(f"{src}: target_modules regex {tm!r} selects {name} in only some "
                                   f"layers; adapters on a subset of layers are unsupported")
        if not out:
            raise LayerIFError(f"{src}: target_modules regex {tm!r} matches no module of this model "
                               f"(modules: {', '.join(LINEARS)})")
        return tuple(n for n in LINEARS if n in out)
    if not isinstance(tm, (list, tuple)) or not tm:
        raise LayerIFError(f"{src}: target_modules must be a non-empty list or a string")
    out = []
    for t in tm:
        name = str(t).split(".")[-1]  # PEFT matches a module equal to t or ending in "." + t
        if name not in LINEARS or not (str(t) == name or str(t).endswith(f"{_sub(name)}.{name}")):
            raise LayerIFError(f"{src}: target module {t!r} matches no module of this model "
                               f"(modules: {', '.join(LINEARS)})")
        out.append(name)
    return tuple(n for n in LINEARS if n in out)


def read_adapter_config(adapter_dir: str | Path, num_layers: int) -> LoraConfig:
    """The LoraConfig of a PEFT adapter dir, refusing features this library cannot apply."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise LayerIFError(f"adapter directory not found: {adapter_dir}")
    if not path.is_file():
        raise LayerIFError(f"{adapter_dir} has no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LayerIFError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(conf, dict):
        raise LayerIFError(f"{path}: expected a JSON object")
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise LayerIFError(f"{path}: peft_type {conf.get('peft_type')!r} is unsupported (only LORA)")
    for key, what in _UNSUPPORTED.items():
        if conf.get(key):
            raise LayerIFError(f"{path}: {what} is unsupported")
    if conf.get("bias", "none") != "none":
        raise LayerIFError(f"{path}: bias {conf.get('bias')!r} is unsupported (only 'none')")
    if conf.get("fan_in_fan_out"):
        raise LayerIFError(f"{path}: fan_in_fan_out is unsupported")
    targets = _targets_of(conf.get("target_modules"), num_layers, str(path))
    try:
        r = int(conf["r"])
        alpha = float(conf.get("lora_alpha", 8))
        drop = float(conf.get("lora_dropout") or 0.0)
    except KeyError as e:
        raise LayerIFError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LayerIFError(f"{path}: bad r / lora_alpha / lora_dropout: {e}") from None
    return LoraConfig(rank=r, alpha=alpha, dropout=drop, targets=targets)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 (checksums verified, NaN/inf refused by name)."""
    return {k: v.astype(np.float32)
            for k, v in safetensors_io.SafetensorsFile(path).read_all().items()}


def load_peft_adapter(model, adapter_dir: str | Path):
    """Apply (in place) and fill the LoRA of a PEFT adapter dir. Returns the model.

    All keys and shapes are checked before the model is touched. Existing LoRA on
    modules the adapter does not target is removed.
    """
    adapter_dir = Path(adapter_dir)
    cfg = model.cfg
    L = cfg.num_layers
    lcfg = read_adapter_config(adapter_dir, L)
    wpath = adapter_dir / WEIGHTS_NAME
    if not wpath.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise LayerIFError(f"{adapter_dir} holds adapter_model.bin (pickle); only "
                               f"{WEIGHTS_NAME} is supported")
        raise LayerIFError(f"{adapter_dir} has no {WEIGHTS_NAME}")
    raw = _read_tensors(wpath)

    found: dict[tuple[str, int, str], tuple[str, np.ndarray]] = {}
    for k, t in raw.items():
        m = _KEY.match(k)
        if not m:
            raise LayerIFError(f"{wpath}: unexpected tensor {k} (not a LoRA A/B of a decoder "
                               f"block linear map)")
        l, sub, name, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if name not in LINEARS or sub != _sub(name):
            raise LayerIFError(f"{wpath}: tensor {k} names no module of this model")
        if name not in lcfg.targets:
            raise LayerIFError(f"{wpath}: tensor {k} is for {name}, which target_modules "
                               f"({', '.join(lcfg.targets)}) does not include")
        if l >= L:
            raise LayerIFError(f"{wpath}: tensor {k} is for layer {l}; the model has {L} layers")
        if (name, l, which) in found:
            raise LayerIFError(f"{wpath}: duplicate tensors for {name} layer {l} lora_{which} "
                               f"({found[(name, l, which)][0]} and {k})")
        found[(name, l, which)] = (k, t)

    stacks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    r = lcfg.rank
    for name in lcfg.targets:
        d_in, d_out = cfg.linear_shape(name)
        a = np.empty((L, d_in, r), np.float32)
        b = np.empty((L, r, d_out), np.float32)
        for l in range(L):
            for which, want, dst in (("A", (r, d_in), a), ("B", (d_out, r), b)):
                if (name, l, which) not in found:
                    raise LayerIFError(f"{wpath}: missing tensor {peft_key(l, name, which)}")
                k, t = found[(name, l, which)]
                if tuple(t.shape) != want:
                    raise LayerIFError(f"{wpath}: shape mismatch {k}: adapter {tuple(t.shape)}, "
                                       f"model expects {want} (r={r}, d_in={d_in}, d_out={d_out})")
                dst[l] = t.T
        stacks[name] = (a, b)

    # all checks passed: modify the model
    for name, lin in model.layers.linears().items():
        if name not in lcfg.targets and lin.lora_a is not None:
            lin.lora_a = None
            lin.lora_b = None
            lin.lora_scale = 0.0
            lin.lora_dropout = 0.0
    apply_lora(model, lcfg)
    for name, (a, b) in stacks.items():
        lin = model.layers.linears()[name]
        lin.lora_a.set_value(jnp.asarray(a))
        lin.lora_b.set_value(jnp.asarray(b))
    return model


def find_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter dir itself, or a `layerif finetune` output dir holding adapter/."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    if not path.exists():
        raise LayerIFError(f"adapter path not found: {path}")
    if (path / "checkpoints").is_dir():
        raise LayerIFError(f"{path} holds fine-tuning checkpoints but no adapter/ (the run did "
                           f"not finish; rerun finetune with the same output dir to resume)")
    raise LayerIFError(f"{path} is neither a PEFT adapter dir ({CONFIG_NAME}) nor a finetune "
                       f"output dir (adapter/{CONFIG_NAME})")


def load_adapter(model, path: str | Path):
    """Load a PEFT adapter dir or a finetune output dir (which contains adapter/) into `model`."""
    return load_peft_adapter(model, find_adapter_dir(path))
