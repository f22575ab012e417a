"""`layerif moe train|eval`: LoRA-MoE with per-layer expert counts (METHOD.md section 4)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .common import (Command, Group, ModelArgs, OverwriteArgs, TrainArgs, examples,
                     load_model_checked, load_tokenizer_of, out_dir, out_file, pad_id,
                     tokenizer_and_model)
from .options import (REQUIRED, data_file, input_file, input_path, nonneg_float, opt,
                      output_path, positive_float, positive_int)


@dataclasses.dataclass(frozen=True)
class MoeTrainConfig(OverwriteArgs, TrainArgs, ModelArgs):
    experts: str = opt(REQUIRED, "allocation JSON: `layerif allocate experts --out`, or "
                                 "`layerif run`'s report/allocation.json with --allocation",
                       type=input_file("allocation file"))
    allocation: str | None = opt(None, "which allocation of a file holding several (e.g. "
                                       "layerif, uniform, mola-2-4-6-8)", shown="the only one")
    out: str = opt(REQUIRED, "output dir: adapter/, checkpoints/ (a rerun resumes from it)",
                   type=output_path)
    epochs: int = opt(3, "epochs over the training records", type=positive_int)
    max_len: int = opt(256, "tokens per example (longer records are truncated, with a note)",
                       type=positive_int)
    rank: int = opt(8, "rank of every expert", type=positive_int)
    alpha: float = opt(16.0, "LoRA alpha of every expert", type=positive_float)
    targets: str = opt("q,k,v,o,gate,up,down", "comma-separated linear maps with experts")
    top_k: int | None = opt(None, "experts per token in every layer", type=positive_int,
                            shown="the file's top_k, else 2 where a layer has > 1 expert")
    aux_coef: float = opt(0.0, "Switch load-balancing loss coefficient (paper option 0.001)",
                          type=nonneg_float, shown="0, off")

    def __post_init__(self):
        from ..models.lora import normalize_targets
        normalize_targets(self.targets)
        self.train_config()


def run_train(cfg: MoeTrainConfig, rt) -> None:
    from flax import nnx

    from ..applications.moe import MoELoraModel, read_allocation, train_moe

    with out_dir(cfg.out, "moe train", cfg.overwrite) as out:
        source = cfg.model_source()
        tok = load_tokenizer_of(source)
        train = examples(tok, cfg.data, cfg.limit, cfg.max_len, cfg.mask_prompt,
                         "training records")
        val = (examples(tok, cfg.val, cfg.val_limit, cfg.max_len, cfg.mask_prompt,
                        "validation records") if cfg.val else None)
        from .allocate import model_config
        experts, ks = read_allocation(cfg.experts, model_config(source).num_layers, cfg.top_k,
                                      cfg.allocation)
        model = load_model_checked(source, cfg.dtype, tok)
        moe = MoELoraModel(model, experts, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                           top_k=ks, rngs=nnx.Rngs(cfg.seed))
        hist = train_moe(moe, train, out, cfg.train_config(), val_examples=val,
                         aux_coef=cfg.aux_coef, progress=rt.progress, pad_id=pad_id(tok),
                         base_model_name=source)
    last = hist["epochs"][-1] if hist.get("epochs") else {}
    print(f"trained LoRA-MoE (experts {' '.join(map(str, experts))}) on {cfg.data}: "
          f"{json.dumps(last)}")
    print(f"adapter: {Path(cfg.out) / 'adapter'}")


@dataclasses.dataclass(frozen=True)
class MoeEvalConfig(OverwriteArgs, ModelArgs):
    adapter: str | None = opt(None, "MoE adapter dir (or a `moe train` output dir)",
                              type=input_path("adapter"), shown="none: the base model")
    data: str = opt(REQUIRED, "task file (qa_*, glue_*)", type=data_file)
    limit: int | None = opt(None, "first N records", type=positive_int, shown="all")
    mode: str = opt("generate", "greedy generation, or the most likely answer",
                    choices=("generate", "loglik"))
    top_k: int | None = opt(None, "experts per token in every layer", type=positive_int,
                            shown="the adapter's")
    batch_size: int = opt(8, "prompts per batch", type=positive_int)
    max_new_tokens: int = opt(16, "generated tokens per prompt", type=positive_int)
    max_len: int = opt(256, "tokens per prompt", type=positive_int)
    out: str | None = opt(None, "write the results as JSON", type=output_path,
                          shown="print only")


def run_eval(cfg: MoeEvalConfig, rt) -> None:
    from ..applications.moe import load_moe_adapter
    from ..evaluation import accuracy

    with out_file(cfg.out, "moe eval", cfg.overwrite) as out:
        source, tok, model = tokenizer_and_model(cfg)
        if cfg.adapter:
            model = load_moe_adapter(model, cfg.adapter, top_k=cfg.top_k)
        res = accuracy(model, tok, cfg.data, cfg.limit, cfg.mode, batch_size=cfg.batch_size,
                       max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len)
        print(f"{res['task']}: accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}, "
              f"mode {res['mode']}, unparsed {res['unparsed']})")
        if out:
            out.write_json(res)
            print(f"results -> {cfg.out}")


GROUP = Group("moe", "LoRA-MoE with per-layer expert counts: train, eval", (
    Command("train", "train MoE-LoRA experts and routers (resumes from OUT)", MoeTrainConfig,
            run_train, stopped="a checkpoint was saved after the last finished step; run the "
                               "same command again to resume"),
    Command("eval", "accuracy by greedy generation (or log-likelihood)", MoeEvalConfig,
            run_eval),
))
