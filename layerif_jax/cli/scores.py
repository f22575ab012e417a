"""`layerif scores`: per-layer influence and the LayerIF layer scores (METHOD.md 2-3)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

from .common import (AGGREGATES, ESTIMATORS, Command, ModelArgs, OverwriteArgs, examples,
                     load_model_checked, load_tokenizer_of, out_dir)
from .options import (REQUIRED, byte_size, data_file, input_path, key_value, opt,
                      output_path, positive_float, positive_int)

UNITS = ("tensor", "module", "block")
PROGRESS_DIR = "progress"   # OUT/progress: the saved gradient passes of an unfinished run


@dataclasses.dataclass(frozen=True)
class ScoresConfig(OverwriteArgs, ModelArgs):
    lora: str = opt(REQUIRED, "PEFT adapter dir or `layerif finetune` output dir",
                    type=input_path("adapter"))
    train: str = opt(REQUIRED, "training records (JSON list or JSONL)", type=data_file)
    val: str = opt(REQUIRED, "validation records (JSON list or JSONL)", type=data_file)
    out: str = opt(REQUIRED, "output dir: scores.json, per_example.npy, scores.png "
                             "(+ per_val*.npy)", type=output_path)
    n_train: int = opt(300, "first n training records", type=positive_int)
    n_val: int = opt(50, "first m validation records", type=positive_int)
    estimator: str = opt("datainf", "inverse-Hessian estimator", choices=ESTIMATORS)
    estimator_options: list = opt([], "the estimator's options, NAME=VALUE each (cg, lissa: "
                                      "tol=1e-3 max_iter=500; arnoldi: k=40; kfac, ekfac: "
                                      "factors_dir=DIR)", type=key_value,
                                  nargs="*", metavar="NAME=VALUE", shown="none")
    curvature: str = opt("empirical_fisher", "what the inverse is of: the empirical Fisher, "
                                             "the Gauss-Newton matrix, the true Fisher (labels "
                                             "drawn from the model) or the Hessian; other than "
                                             "the empirical Fisher: cg, lissa, arnoldi, exact "
                                             "(per-example gradients one at a time) or kfac, "
                                             "ekfac with the true Fisher",
                         choices=("empirical_fisher", "gauss_newton", "true_fisher", "hessian"))
    aggregate: str = opt("+ve", "layer score S reported first", choices=AGGREGATES)
    unit: str = opt("tensor", "unit of inversion: each LoRA tensor, module (A and B) or block",
                    choices=UNITS)
    damping: float | None = opt(None, "fixed lambda for every unit", type=positive_float,
                                shown="adaptive, 0.1 x mean ||g||^2 / d per unit")
    per_val: bool = opt(False, "also write n x m (and n x m x L) scores")
    max_len: int = opt(128, "tokens per example (longer records are truncated, with a note)",
                       type=positive_int)
    mask_prompt: bool = opt(False, "only the output tokens count in the loss")
    chunk_size: int = opt(8, "examples per packed chunk", type=positive_int)
    chunks_per_call: int = opt(4, "chunks run by one compiled call", type=positive_int)
    memory_budget: str = opt("8GB", "keep per-example gradients up to this size (8GB, "
                                    "512MiB, 1e9); recompute the rest", type=byte_size)
    bf16: bool = opt(False, "bfloat16 forward/backward, float32 sums")
    skip_zero_units: bool = opt(False, "skip units whose gradient is zero on every example")
    checkpoint_every: int = opt(8, "save the gradient passes into OUT/progress every N "
                                   "training calls: the same command resumes a killed run",
                                type=positive_int)
    mesh: str = opt("auto", "device mesh DATAxMODEL (e.g. 2x4; needs --sharding fsdp or "
                            "fsdp_tp), or auto: every device on the data axis")
    sharding: str = opt("dp", "parameters whole on every device (dp), split over the data "
                              "axis (fsdp), and heads / MLP / vocabulary over the model axis "
                              "(fsdp_tp)", choices=("dp", "fsdp", "fsdp_tp"))
    remat: str | None = opt(None, "recompute the blocks in the backward: mlp (the default "
                                  "when given alone: the attention half kept, the MLP half "
                                  "recomputed, about +25%% FLOPs) or full (only the residual "
                                  "stream between blocks kept, about +50%% FLOPs)",
                            choices=("mlp", "full"), nargs="?", const="mlp", shown="off")

    def __post_init__(self):
        if self.mesh != "auto":
            from ..sharding import make_mesh_shape
            make_mesh_shape(self.mesh)


def compute(cfg: ScoresConfig, rt, model=None, tok=None, source: str | None = None,
            checkpoint_dir=None):
    """(LayerScores, scores.json settings). `model` (with its LoRA) and `tok` may be given;
    otherwise they are loaded from --model and --lora. `checkpoint_dir`: where the
    gradient passes are saved and resumed from (`influence.resume`)."""
    import jax.numpy as jnp

    from ..influence import get_estimator, layer_scores

    from ..influence.api import resolve_mesh
    from ..influence.driver import Settings

    options = dict(cfg.estimator_options)
    # unknown options, and a curvature the estimator does not take, refused before any work
    Settings(get_estimator(cfg.estimator, **options), curvature=cfg.curvature)
    mesh = resolve_mesh(cfg.mesh, cfg.sharding)   # the devices, before any model loads
    source = source or cfg.model_source()
    tok = tok or load_tokenizer_of(source)
    # over several processes each tokenises (packs, puts) only its share of the examples
    train = examples(tok, cfg.train, cfg.n_train, cfg.max_len, cfg.mask_prompt,
                     "training records", mesh=mesh)
    val = examples(tok, cfg.val, cfg.n_val, cfg.max_len, cfg.mask_prompt, "validation records",
                   mesh=mesh)
    if model is None:
        from ..formats.peft import load_adapter
        # a sharded preset loads every parameter straight into its shards
        sharded = mesh is not None and cfg.sharding != "dp"
        model = load_model_checked(source, cfg.dtype, tok, mesh=mesh if sharded else None,
                                   sharding=cfg.sharding)
        load_adapter(model, cfg.lora)
    res = layer_scores(model, train, val, estimator=cfg.estimator, aggregate=cfg.aggregate,
                       unit=cfg.unit, damping=cfg.damping, per_val=cfg.per_val,
                       chunk_size=cfg.chunk_size, chunks_per_call=cfg.chunks_per_call,
                       memory_budget=cfg.memory_budget,
                       dtype=jnp.bfloat16 if cfg.bf16 else None, progress=rt.progress,
                       skip_zero_units=cfg.skip_zero_units, estimator_options=options,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.checkpoint_every,
                       mesh=mesh, sharding=cfg.sharding, remat=cfg.remat,
                       curvature=cfg.curvature)
    info = {"model": source, "adapter": str(cfg.lora), "train": str(cfg.train),
            "val": str(cfg.val), "max_len": cfg.max_len, "mask_prompt": cfg.mask_prompt,
            "estimator_options": options, "curvature": cfg.curvature, "mesh": cfg.mesh,
            "sharding": cfg.sharding}
    return res, info


def write(res, out, cfg: ScoresConfig, info: dict) -> None:
    from ..influence.output import write_scores
    write_scores(res, out, title=f"LayerIF ({res.estimator}, {res.aggregate}) — "
                                 f"{Path(str(cfg.train)).name}", **info)


def run(cfg: ScoresConfig, rt) -> None:
    import jax

    from ..influence.distributed import agree, sync
    if jax.process_count() > 1 and jax.process_index() != 0:
        return _follow(cfg, rt)
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(out_dir(cfg.out, "scores", cfg.overwrite))
        except BaseException:
            agree(False)   # process 0 could not open OUT: the other processes stop too
            raise
        agree(True)   # the output is ours: the other processes go on
        progress = Path(out.path) / PROGRESS_DIR
        if cfg.overwrite and PROGRESS_DIR in out.owned and progress.exists():
            shutil.rmtree(progress)   # --overwrite: this command's earlier progress goes too
        # the progress is this command's own entry (claimed when the passes begin, so
        # a run refused before them leaves nothing), a rerun resumes from it, and the
        # results' commit drops it (it is not written again)
        from ..influence.resume import Checkpoint
        ckpt = Checkpoint(progress, cfg.checkpoint_every,
                          hint="choose another --out, or pass --overwrite to start over",
                          on_create=lambda: out.claim([PROGRESS_DIR]))
        res, info = compute(cfg, rt, checkpoint_dir=ckpt)
        sync("scores-computed")
        write(res, out, cfg, info)
    print(f"layer scores ({res.estimator}, {res.aggregate}) for {res.n_train} x {res.n_val} "
          f"examples in {res.seconds:.1f} s -> {Path(cfg.out) / 'scores.json'}")


def _follow(cfg: ScoresConfig, rt) -> None:
    """A process other than the first of a multi-process run: the same passes on its own
    devices' rows (saving into the same OUT/progress), and nothing written besides: the
    first process holds OUT and writes the results."""
    from ..errors import LayerIFError
    from ..influence.distributed import agree, sync
    from ..influence.resume import Checkpoint
    if not agree(False):
        raise LayerIFError(f"process 0 could not open {cfg.out} (its error says why)")
    ckpt = Checkpoint(Path(cfg.out).expanduser().absolute() / PROGRESS_DIR,
                      cfg.checkpoint_every, hint="choose another --out, or pass --overwrite "
                                                 "to start over")
    compute(cfg, rt, checkpoint_dir=ckpt)
    sync("scores-computed")


COMMAND = Command("scores", "per-layer influence and LayerIF layer scores", ScoresConfig, run,
                  stopped="no scores were written; the gradient passes done so far are kept "
                          "in OUT/progress and the same command resumes from them",
                  multi_process=True)
