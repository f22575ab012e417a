"""`layerif bench`: every estimator on the built-in benchmarks, into one resumable report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import LayerIFError
from .common import ESTIMATORS, Command, ModelArgs, OverwriteArgs, load_model_checked
from .options import REQUIRED, input_path, opt, output_path, positive_int

# the runner's names (bench/runner.py), repeated so that parsing imports no jax; a test
# keeps them equal
SUITES = ("lds-digits", "mislabel-digits", "estimators-lm", "class-detection", "lds-lm")
LM_SUITES = ("estimators-lm", "class-detection", "lds-lm")


def _names(what: str, valid: tuple):
    def parse(s: str) -> tuple:
        import argparse
        names = tuple(x for x in s.split(",") if x)
        bad = [x for x in names if x not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0] if bad else s!r} (choose "
                                             f"from {', '.join(valid)})")
        return names
    return parse


def _default_tasks() -> str | None:
    from ..io import shared_data_dir
    d = shared_data_dir()
    return str(d / "layerif-tasks") if d else None


@dataclasses.dataclass(frozen=True)
class BenchConfig(OverwriteArgs, ModelArgs):
    out: str = opt(REQUIRED, "output dir: report.json, report.md, plots, sections/",
                   type=output_path)
    suites: tuple = opt(SUITES, "benchmarks, comma-separated", type=_names("benchmark", SUITES),
                        shown=",".join(SUITES))
    quick: bool = opt(False, "small sizes (minutes on a CPU)")
    estimators: tuple | None = opt(None, "estimators of the LM benchmarks, comma-separated",
                                   type=_names("estimator", ESTIMATORS), shown="all")
    configs: str | None = opt(None, "rows of the digits benchmarks, comma-separated "
                                    "estimator:curvature:unit (e.g. exact:gauss_newton:block)",
                              shown="all")
    lora: str | None = opt(None, "adapter of the LM benchmarks (PEFT dir or `layerif "
                                 "finetune` output)", type=input_path("adapter"),
                           shown="a random LoRA r=8 on every map")
    lora_seed: int = opt(0, "seed of the random LoRA")
    n: int | None = opt(None, "training records of estimators-lm", type=positive_int,
                        shown="300, --quick 40")
    m: int | None = opt(None, "validation records of estimators-lm", type=positive_int,
                        shown="50, --quick 10")
    per_task: int | None = opt(None, "training records per task of class-detection",
                               type=positive_int, shown="25, --quick 10")
    subsets: int | None = opt(None, "retrained halves of lds-lm", type=positive_int,
                              shown="32, --quick 4")
    tasks_dir: str | None = opt(None, "the paper's task files", type=input_path("task folder"),
                                shown="../shared/data/layerif-tasks")


def run(cfg: BenchConfig, rt) -> None:
    from ..bench import run_bench, settings_for

    over = {"estimators-lm": {k: v for k, v in (("n", cfg.n), ("m", cfg.m)) if v},
            "class-detection": {"per_task": cfg.per_task} if cfg.per_task else {},
            "lds-lm": {"subsets": cfg.subsets} if cfg.subsets else {}}
    if cfg.estimators:
        for s in LM_SUITES:
            over[s]["estimators"] = list(cfg.estimators)
    if cfg.configs:
        for s in ("lds-digits", "mislabel-digits"):
            over[s] = {"configs": cfg.configs}
    settings = settings_for(cfg.suites, cfg.quick, over)
    tasks = cfg.tasks_dir or _default_tasks()
    if any(s in LM_SUITES for s in cfg.suites) and not (tasks and Path(tasks).is_dir()):
        raise LayerIFError("the LM benchmarks need the paper's task files: give --tasks-dir")
    run_bench(cfg.out, settings, lm_setup=lambda load: _lm_setup(cfg, load),
              tasks_dir=Path(tasks) if tasks else None, overwrite=cfg.overwrite)
    print(f"report -> {Path(cfg.out) / 'report.md'}")


def _lm_setup(cfg: BenchConfig, load: bool):
    """(model with its LoRA, tokenizer, identity); the model only when `load`."""
    from .. import checksum
    source = cfg.model_source()
    ident = {"model": str(Path(source).absolute()),
             "adapter": ({"path": str(Path(cfg.lora).absolute()),
                          "files": checksum.file_digests(Path(cfg.lora))} if cfg.lora
                         else f"random LoRA r=8 alpha=16, seed {cfg.lora_seed}")}
    if not load:
        return None, None, ident
    from ..bench import random_lora
    from ..models.tokenizer import load_tokenizer
    tok = load_tokenizer(source)
    model = load_model_checked(source, cfg.dtype, tok)
    if cfg.lora:
        from ..formats.peft import load_adapter
        load_adapter(model, cfg.lora)
    else:
        random_lora(model, cfg.lora_seed)
    return model, tok, ident


COMMAND = Command("bench", "every estimator on the built-in benchmarks (LDS, mislabel and "
                           "task detection, cost and agreement), one resumable report",
                  BenchConfig, run,
                  stopped="the finished benchmarks are kept in OUT/sections: the same "
                          "command resumes there")
