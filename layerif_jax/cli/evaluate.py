"""`layerif eval ppl|mc`: perplexity and zero-shot multiple-choice accuracy."""

from __future__ import annotations

import dataclasses
import json

from .common import Command, Group, ModelArgs, OverwriteArgs, out_file, tokenizer_and_model
from .options import REQUIRED, data_file, input_file, opt, output_path, positive_int


def _emit(result: dict, out) -> None:
    print(json.dumps(result, indent=2,
                     default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    if out:
        out.write_json(result)


@dataclasses.dataclass(frozen=True)
class PplConfig(OverwriteArgs, ModelArgs):
    data: str = opt(REQUIRED, "raw text file (e.g. wiki.test.raw)", type=input_file("text file"))
    window: int = opt(1024, "tokens per non-overlapping window", type=positive_int)
    max_tokens: int | None = opt(None, "use only the first N tokens", type=positive_int,
                                 shown="all")
    batch_size: int = opt(4, "windows per forward pass", type=positive_int)
    out: str | None = opt(None, "also write the result JSON here", type=output_path,
                          shown="print only")


def run_ppl(cfg: PplConfig, rt) -> None:
    from ..evaluation import perplexity

    with out_file(cfg.out, "eval ppl", cfg.overwrite) as out:
        source, tok, model = tokenizer_and_model(cfg)
        res = perplexity(model, tok, cfg.data, window=cfg.window, max_tokens=cfg.max_tokens,
                         batch_size=cfg.batch_size, progress=rt.progress)
        _emit({"model": source, "data": str(cfg.data), **res}, out)


@dataclasses.dataclass(frozen=True)
class McConfig(OverwriteArgs, ModelArgs):
    task: list = opt(REQUIRED, "task JSON/JSONL file(s)", type=data_file, nargs="+")
    limit: int | None = opt(None, "first N records of each task", type=positive_int,
                            shown="all")
    style: str = opt("text", "QA candidates: choice texts (zero-shot) or the fine-tuning "
                             "format", choices=("text", "letter"))
    batch_size: int = opt(8, "sequences per forward pass", type=positive_int)
    max_len: int | None = opt(None, "truncate prompts to this many tokens", type=positive_int,
                              shown="the model's context")
    out: str | None = opt(None, "also write the result JSON here", type=output_path,
                          shown="print only")


def run_mc(cfg: McConfig, rt) -> None:
    from ..evaluation import mc_accuracy

    with out_file(cfg.out, "eval mc", cfg.overwrite) as out:
        source, tok, model = tokenizer_and_model(cfg)
        results = [mc_accuracy(model, tok, t, cfg.limit, style=cfg.style,
                               batch_size=cfg.batch_size, max_len=cfg.max_len,
                               progress=rt.progress) for t in cfg.task]
        mean = sum(r["accuracy"] for r in results) / len(results)
        _emit({"model": source, "style": cfg.style, "tasks": results, "mean_accuracy": mean},
              out)


GROUP = Group("eval", "perplexity or zero-shot multiple-choice accuracy", (
    Command("ppl", "perplexity on raw text (WikiText-2 style)", PplConfig, run_ppl),
    Command("mc", "zero-shot multiple choice by answer log-likelihood", McConfig, run_mc),
))
