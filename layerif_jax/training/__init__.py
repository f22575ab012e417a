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

from .config import TrainConfig, lr_at, make_optimizer, make_schedule, opt_spec, optimizer_of
from .finetune import batch_loss, evaluate, finetune, validation_loss
from .loop import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    FILE_SUMS,
    HISTORY_FILE,
    STATE_FILE,
    LoopResult,
    RunData,
    cast_like,
    finish_run,
    fit_examples,
    float32_master,
    pad_length,
    prepare_run,
    run_dir,
    run_fingerprint,
    train_loop,
)
from .steps import (
    accumulate,
    accumulated_grads,
    eval_loss_sum,
    real_loss_sum,
    split_model,
    train_step,
    tree_norm,
)

__all__ = ["TrainConfig", "make_schedule", "lr_at", "optimizer_of", "opt_spec",
           "make_optimizer", "split_model", "real_loss_sum", "accumulate", "accumulated_grads",
           "tree_norm", "train_step", "eval_loss_sum", "CHECKPOINT_DIR", "FILE_SUMS",
           "ADAPTER_DIR", "STATE_FILE", "HISTORY_FILE", "fit_examples", "pad_length",
           "run_fingerprint", "LoopResult", "train_loop", "finish_run", "run_dir", "RunData",
           "prepare_run", "float32_master", "cast_like", "finetune", "evaluate", "batch_loss",
           "validation_loss"]
