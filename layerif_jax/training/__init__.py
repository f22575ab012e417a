"""LoRA fine-tuning (METHOD.md sections 1 and 4): AdamW, linear warm-up then linear decay.

One optimizer step is ONE jitted pure function of (LoRA state, optimizer state, frozen
base state, a [grad_accum, batch_size, T] block of micro-batches, RNG key). Gradients
are taken with respect to the LoRA parameters only (`nnx.split(model, nnx.LoRAParam,
...)`); the base parameters are an ordinary (non-differentiated) argument.

Gradient accumulation is explicit, a `lax.scan` over the micro-batches inside the
jitted step, rather than `optax.MultiSteps`:
  * the loss of an optimizer step is the mean over the *real* rows of the whole
    effective batch (filler rows, index -1, never count), so micro-batch gradients
    are summed and divided once by the real-row count: `accum 2 x batch 2` is exactly
    `accum 1 x batch 4` even when the last batch of an epoch is partly filler;
    MultiSteps averages micro-batch means with equal weight, which is wrong there;
  * one dispatch per optimizer step and no accumulator buffer in the optimizer state
    (smaller checkpoints, optimizer state = the plain AdamW state);
  * the optimizer step count equals the schedule step, so the schedule, the data
    position and the checkpoint step are all the same number.

Data order depends only on (seed, epoch): an epoch is `epoch_batches` with the
effective batch size (batch_size * grad_accum), reshaped into micro-batches. Resuming
from a checkpoint at global step s therefore restarts epoch s // steps_per_epoch at
batch s % steps_per_epoch and reproduces the uninterrupted run. Dropout keys are
`fold_in(key(seed), step)` (computed inside the step), so they too survive a restart."""

from __future__ import annotations

from . import config as _config, finetune as _finetune, loop as _loop, steps as _steps
from .config import *  # noqa: F403
from .finetune import *  # noqa: F403
from .loop import *  # noqa: F403
from .steps import *  # noqa: F403

__all__ = [*_config.__all__, *_finetune.__all__, *_loop.__all__, *_steps.__all__]
