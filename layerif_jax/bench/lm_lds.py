"""Linear datamodeling score (LDS) of every estimator on a LoRA fine-tune of a causal LM.

TRAK's protocol with the library's own fine-tuning (`training.finetune`): the model's
LoRA is the initialisation; it is fine-tuned on all of `train` and every estimator
scores the training examples against each validation example there (one
`layer_scores(..., per_val=True)` call for all); then K random halves of `train` are
each fine-tuned from the same initialisation with the same settings (same epochs, so
half the steps), and each validation example's loss is measured. Per validation
example, the Spearman correlation across the halves between the predicted loss
(-sum of the half's influences) and the measured one, averaged (`metrics.lds`).

The retrains are the cost (K fine-tunes); each finished one is recorded at once in
`state` (a JSON file) with a digest of everything that decides it (settings, data,
base weights, initial adapter), so a stopped run resumes with the halves it has, and a
file from another run is refused.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import LayerIFError
from ..io import read_json, write_json
from .lm import ESTIMATORS, own_seconds, run_all
from .metrics import lds


def example_losses(model, examples, batch_size: int = 8) -> np.ndarray:
    """[len(examples)] float64: each example's mean token loss under `model` (no dropout)."""
    from flax import nnx

    from ..data import epoch_batches
    from ..training.loop import pad_length
    from ..training.steps import per_example_losses
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    out = np.full(len(examples), np.nan)
    length = pad_length(examples, max(len(e.ids) for e in examples))
    for b in epoch_batches(examples, batch_size, seed=0, epoch=0, max_len=length,
                           shuffle=False):
        per = np.asarray(per_example_losses(lora, rest, b.ids, b.mask, b.targets,
                                            graphdef=graphdef), np.float64)
        real = np.asarray(b.index) >= 0
        out[np.asarray(b.index)[real]] = per[real]
    return out


def _identity(model, train, val, cfg, subsets) -> dict:
    """What decides the retrains' losses: the fine-tuning fingerprint of a half
    (`training.loop.run_fingerprint`: settings, data, base weights, initial LoRA) with the
    validation data and the halves; as JSON reads it back."""
    import json

    from flax import nnx

    from .. import checksum
    from ..training.loop import run_fingerprint
    steps = -(-(len(train) // 2) // cfg.batch_size) * cfg.epochs
    fp = run_fingerprint(cfg, train, steps, model_config=model.cfg,
                         base=nnx.state(model, nnx.Not(nnx.LoRAParam)),
                         init=nnx.state(model, nnx.LoRAParam),
                         val=checksum.examples_digest(val),
                         subsets=[s.tolist() for s in subsets])
    return json.loads(json.dumps(fp))


def _fine_tuned(model, init, examples, cfg):
    """`model` with its LoRA reset to `init` (host copies) and fine-tuned on `examples`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..training.finetune import finetune
    nnx.update(model, jax.tree.map(jnp.asarray, init))
    with tempfile.TemporaryDirectory(prefix="layerif-lds-") as d:
        finetune(model, examples, Path(d) / "run", cfg, progress=False)
    return model


def lds_lm(model, train, val, subsets: int = 16, estimators=ESTIMATORS, *, epochs: int = 2,
           lr: float = 1e-3, batch_size: int = 8, seed: int = 0, options=None,
           memory_budget="8GB", state: str | Path | None = None, log=print) -> dict:
    """The LDS of every estimator (module docstring). `model` carries the initial LoRA,
    which it has again on return, on an error or a stop too (the fine-tunes change it in
    place meanwhile)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..training.config import TrainConfig
    if len(train) < 4 or subsets < 2 or not val:
        raise LayerIFError(f"the LM LDS needs at least 4 training examples, 2 subsets and a "
                           f"validation example (got {len(train)}, {subsets}, {len(val)})")
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, warmup_steps=0, seed=seed,
                      max_len=max(len(e.ids) for e in train), checkpoint_every=10 ** 6)
    rng = np.random.default_rng(seed + 1)
    halves = [np.sort(rng.choice(len(train), len(train) // 2, replace=False))
              for _ in range(subsets)]
    init = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))   # host copies
    ident = _identity(model, train, val, cfg, halves)
    done: dict[str, list] = {}
    seconds: dict[str, float] = {}   # each retrain's own, kept across a resume
    if state is not None and Path(state).is_file():
        saved = read_json(state)
        if saved.get("identity") != ident:
            raise LayerIFError(f"{state} records the retrains of another LDS run (other data, "
                               f"model, adapter or settings); remove it or use another --out")
        done, seconds = saved["losses"], saved.get("seconds", {})
    try:
        t0 = time.perf_counter()
        for k, s in enumerate(halves):
            if str(k) in done:
                continue
            t1 = time.perf_counter()
            _fine_tuned(model, init, [train[i] for i in s], cfg)
            done[str(k)] = example_losses(model, val, batch_size).tolist()
            seconds[str(k)] = round(time.perf_counter() - t1, 2)
            if state is not None:
                write_json(state, {"identity": ident, "losses": done, "seconds": seconds})
            log(f"lds-lm      retrain {k + 1}/{subsets} ({time.perf_counter() - t0:.0f} s)")
        actual = np.array([done[str(k)] for k in range(subsets)])
        retrain = sum(seconds.values())   # this run's and those of the runs it resumes
        t0 = time.perf_counter()
        _fine_tuned(model, init, list(train), cfg)
        full_seconds = time.perf_counter() - t0
        base_val = example_losses(model, val, batch_size)
        results, rows, total = run_all(model, train, val, estimators, options, log,
                                       per_val=True, memory_budget=memory_budget)
    finally:
        nnx.update(model, jax.tree.map(jnp.asarray, init))
    for name, res in results.items():
        rows.append({"estimator": name, "lds": lds(np.asarray(res.per_val), halves, actual),
                     "seconds_own": round(own_seconds(res), 2)})
        log(f"lds-lm      {name:9s} LDS {rows[-1]['lds']:.3f}")
    return {"n_train": len(train), "n_val": len(val), "subsets": subsets,
            "steps_full": -(-len(train) // batch_size) * epochs,
            "val_loss_full": float(base_val.mean()),
            "val_loss_halves": float(actual.mean()),
            "val_losses": actual.tolist(),   # [subsets, n_val]: what the LDS ranks against
            "retrain_seconds": round(retrain, 1), "finetune_seconds": round(full_seconds, 1),
            "total_seconds": round(total, 1), "rows": rows}


__all__ = ["lds_lm", "example_losses"]
