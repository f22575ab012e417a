"""LoRA adapters on the stacked linear maps, typed `nnx.LoRAParam`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import LayerIFError
from .config import LINEARS

ALIASES = {n.split("_")[0]: n for n in LINEARS}  # "q" -> "q_proj", ...


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEARS

    def __post_init__(self):
        if self.rank < 1:
            raise LayerIFError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise LayerIFError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LayerIFError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", normalize_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def normalize_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    out = []
    for t in targets:
        name = ALIASES.get(t, t)
        if name not in LINEARS:
            raise LayerIFError(
                f"LoRA target {t!r} matches no module (modules: {', '.join(LINEARS)} "
                f"or their short names {', '.join(ALIASES)})")
        if name not in out:
            out.append(name)
    if not out:
        raise LayerIFError("no LoRA targets given")
    return tuple(n for n in LINEARS if n in out)


def apply_lora(model, lcfg: LoraConfig, *, rngs: nnx.Rngs | None = None,
               dtype=jnp.float32):
    """Add LoRA to `model` in place (returns it). A as peft's kaiming-uniform, B = 0."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    for name in lcfg.targets:
        lin = model.layers.linears()[name]
        L, d_in, d_out = lin.kernel.shape
        bound = 1.0 / (d_in ** 0.5)
        a = jax.random.uniform(rngs.params(), (L, d_in, lcfg.rank), dtype, -bound, bound)
        # nnx.data: the attributes start as None, which NNX records as static
        lin.lora_a = nnx.data(nnx.LoRAParam(a))
        lin.lora_b = nnx.data(nnx.LoRAParam(jnp.zeros((L, lcfg.rank, d_out), dtype)))
        lin.lora_scale = float(lcfg.scale)
        lin.lora_dropout = float(lcfg.dropout)
    model.lora_config = lcfg
    return model


def lora_config_of(model) -> LoraConfig | None:
    return getattr(model, "lora_config", None)


def set_lora_dropout(model, rate: float):
    """Change dropout in place (influence is always taken with dropout off)."""
    for lin in model.layers.linears().values():
        if lin.lora_a is not None:
            lin.lora_dropout = float(rate)


def merged_kernel(lin) -> jax.Array:
    """W + scale A B of a StackedLinear with LoRA, in float32, cast to W's dtype (no mutation)."""
    w = lin.kernel[...]
    delta = lin.lora_scale * jnp.einsum(
        "lir,lro->lio", lin.lora_a[...].astype(jnp.float32), lin.lora_b[...].astype(jnp.float32))
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def merge_lora(model):
    """Fold LoRA into the base kernels (W += scale A B) and drop the adapters, in place."""
    for lin in model.layers.linears().values():
        if lin.lora_a is None:
            continue
        lin.kernel[...] = merged_kernel(lin)
        lin.lora_a = lin.lora_b = None
        lin.lora_scale = 0.0
    model.lora_config = None
    return model
