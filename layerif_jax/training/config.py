"""Fine-tuning settings, the learning-rate schedule and the optimizer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optax

from .. import dtypes
from ..errors import LayerIFError

__all__ = ["TrainConfig", "make_schedule", "lr_at", "optimizer_of", "opt_spec",
           "make_optimizer"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. `batch_size` is the micro-batch; effective batch = batch_size * grad_accum.

    `checkpoint_every`: a checkpoint every N optimizer steps, and always at each epoch end.
    `max_grad_norm`: global-norm clipping of the LoRA gradient (None or 0 = off).
    `keep`: checkpoints kept on disk.
    """
    epochs: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 128
    seed: int = 0
    compute_dtype: str = "float32"
    checkpoint_every: int = 50
    max_grad_norm: float | None = 1.0
    keep: int = 2

    def __post_init__(self):
        def need_int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise LayerIFError(f"{name} must be an integer, got {v!r}")
            if v < lo:
                raise LayerIFError(f"{name} must be >= {lo}, got {v}")
        need_int("epochs", 1)
        need_int("batch_size", 1)
        need_int("grad_accum", 1)
        need_int("max_len", 2)
        need_int("warmup_steps", 0)
        need_int("checkpoint_every", 1)
        need_int("keep", 1)
        need_int("seed", 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LayerIFError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise LayerIFError(f"weight decay must be >= 0, got {self.weight_decay!r}")
        g = self.max_grad_norm
        if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
            raise LayerIFError(f"max_grad_norm must be >= 0 or None, got {g!r}")
        try:
            dt = dtypes.name(self.compute_dtype)
        except LayerIFError:
            raise LayerIFError(f"compute dtype must be float32 or bfloat16, got "
                               f"{self.compute_dtype!r}") from None
        object.__setattr__(self, "compute_dtype", dt)
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        object.__setattr__(self, "max_grad_norm", float(g) if g else None)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """lr(step): linear 0 -> lr over the warm-up (clipped to total_steps), then linear lr -> 0
    at total_steps. Step k is the learning rate of the (k+1)-th update (so the first update
    of a warm-up run has lr 0, as in transformers' linear schedule)."""
    total = max(int(total_steps), 1)
    warm = min(cfg.warmup_steps, total)
    if warm == 0:
        return optax.linear_schedule(cfg.lr, 0.0, total)
    if warm == total:
        return optax.linear_schedule(0.0, cfg.lr, warm)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warm), optax.linear_schedule(cfg.lr, 0.0, total - warm)],
        [warm])


def lr_at(cfg: TrainConfig, total_steps: int, step: int) -> float:
    """make_schedule's value in plain Python (for logging: no device op, no sync)."""
    total = max(int(total_steps), 1)
    warm = min(cfg.warmup_steps, total)
    if step < warm:
        return cfg.lr * step / warm
    if warm == total:
        return cfg.lr
    return cfg.lr * (1.0 - min(step - warm, total - warm) / (total - warm))


def optimizer_of(lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 max_grad_norm: float | None) -> optax.GradientTransformation:
    """The optimizer of an `opt_spec` tuple (what a jitted step rebuilds from its static
    argument): AdamW on the warm-up/decay schedule, after clipping."""
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      max_grad_norm=max_grad_norm)
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=weight_decay)
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw


def opt_spec(cfg: TrainConfig, total_steps: int) -> tuple:
    """Hashable description of the optimizer: a static jit argument, so runs with the same
    settings share one compiled step."""
    return (cfg.lr, cfg.weight_decay, cfg.warmup_steps, int(total_steps), cfg.max_grad_norm)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay) on the warm-up/decay
    schedule, after global-norm clipping when cfg.max_grad_norm is set."""
    return optimizer_of(*opt_spec(cfg, total_steps))
