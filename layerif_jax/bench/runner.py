"""`run_bench`: the benchmarks into one output folder, resumable section by section.

Every finished benchmark is written at once to `sections/<suite>.json` (with the
settings that produced it, the model's identity included); a run started again with
the same command skips the finished ones, and one whose settings differ from a
finished section is refused. The report (report.json, report.md, the plots) is
rewritten from the sections at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..checksum import first_difference
from ..errors import LayerIFError
from ..io import OutputDir, write_json
from ..notes import info
from . import digits, lm, lm_lds
from .report import plots, tables

SUITES = ("lds-digits", "mislabel-digits", "estimators-lm", "class-detection", "lds-lm")
LM_SUITES = ("estimators-lm", "class-detection", "lds-lm")
QUICK = {"lds-digits": dict(n=200, m=20, subsets=10),
         "mislabel-digits": dict(n=300, m=60),
         "estimators-lm": dict(n=40, m=10),
         "class-detection": dict(per_task=10, val_per_task=3),
         "lds-lm": dict(n=16, m=4, subsets=4, epochs=1)}
DEFAULTS = {"lds-digits": dict(n=1000, m=100, subsets=50, alpha=1e-2, seed=0),
            "mislabel-digits": dict(n=1000, m=200, flip=0.1, alpha=1e-3, seed=0),
            "estimators-lm": dict(n=300, m=50, task="glue_mrpc", damping_scale=0.1),
            "class-detection": dict(per_task=25, val_per_task=5,
                                    tasks=["glue_cola", "glue_mrpc", "glue_rte", "qa_openbook"]),
            # sized to about a CPU hour (2 cores): 32 fine-tunes of 8 steps of 8 examples
            "lds-lm": dict(n=64, m=16, subsets=32, epochs=2, lr=1e-3, task="glue_mrpc",
                           seed=0)}
SECTIONS = "sections"


def settings_for(suites, quick: bool = False, overrides: dict | None = None) -> dict:
    """{suite: settings}: the defaults, --quick's sizes, then `overrides[suite]`."""
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise LayerIFError(f"unknown benchmark {bad[0]!r} (choose from {', '.join(SUITES)})")
    out = {}
    for s in suites:
        st = {**DEFAULTS[s], **(QUICK[s] if quick else {}), **(overrides or {}).get(s, {})}
        unknown = sorted(set(st) - set(DEFAULTS[s]) - {"estimators", "configs"})
        if unknown:
            raise LayerIFError(f"benchmark {s!r} has no setting {unknown[0]!r}")
        if st.get("configs"):   # refused now, not after the other benchmarks ran
            digits.select(digits.LDS_CONFIGS if s == "lds-digits" else digits.MISLABEL_CONFIGS,
                          st["configs"])
        out[s] = st
    return out


def run_bench(out: str | Path, settings: dict, *, lm_setup: Callable | None = None,
              tasks_dir: Path | None = None, overwrite: bool = False, log=print) -> dict:
    """Run the benchmarks of `settings` ({suite: settings}, see `settings_for`) into
    `out`; returns {suite: {"settings", "result"}}. `lm_setup()` -> (model with LoRA,
    tokenizer, identity dict) is called only when an LM benchmark still has to run; the
    identity joins those benchmarks' settings."""
    od = OutputDir(out, "bench", overwrite=overwrite, flag="--overwrite")
    with od:
        folder = od.claim([SECTIONS]) / SECTIONS
        folder.mkdir(exist_ok=True)
        pending = [s for s in settings if not (folder / f"{s}.json").is_file()]
        if any(s in LM_SUITES for s in settings):
            if tasks_dir is None or not Path(tasks_dir).is_dir():
                raise LayerIFError(f"the LM benchmarks need the task files (layerif-tasks): "
                                   f"{tasks_dir} is not a folder; give --tasks-dir")
        lm_state = (_lm_identity(lm_setup, pending)
                    if any(s in LM_SUITES for s in settings) else None)
        full = {suite: json.loads(json.dumps(
                    {**st, **(lm_state[2] if suite in LM_SUITES else {})}))
                for suite, st in settings.items()}
        sections = {}
        for suite in settings:   # every finished section checked before any benchmark runs
            path = folder / f"{suite}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                diff = first_difference(saved.get("settings", {}), full[suite])
                if diff:
                    raise LayerIFError(f"{od.path} holds the {suite} benchmark run with other "
                                       f"settings ({diff}); use another --out")
                info(f"{suite}: finished earlier, kept ({path})")
                sections[suite] = saved
        for suite, st in settings.items():
            if suite not in sections:
                partial = folder / f"{suite}.partial.json"   # lds-lm's finished retrains
                result = _run(suite, st, lm_state, tasks_dir, log, partial)
                sections[suite] = {"settings": full[suite], "result": result}
                write_json(folder / f"{suite}.json", sections[suite])
                partial.unlink(missing_ok=True)
        sections = {suite: sections[suite] for suite in settings}
        with od.staging(exclusive=False) as stage:
            write_json(stage / "report.json", sections)
            (stage / "report.md").write_text(tables(sections))
            plots(sections, stage)
    return sections


def _lm_identity(lm_setup, pending):
    """(model, tokenizer, identity) -- the model is loaded only if an LM suite is pending."""
    if lm_setup is None:
        raise LayerIFError("the LM benchmarks need a model (--model, and --lora or a random "
                           "LoRA)")
    return lm_setup(load=any(s in LM_SUITES for s in pending))


def _records(tok, tasks_dir, name, split, k):
    from ..data import load_records, tokenize
    path = Path(tasks_dir) / f"{name}_{split}{'_all' if name.startswith('qa_') else ''}.json"
    if not path.is_file():
        raise LayerIFError(f"no task file {path}")
    return tokenize(tok, load_records(path, k), max_len=128, source=str(path))


def _run(suite, st, lm_state, tasks_dir, log, partial: Path):
    est = st.get("estimators")
    if suite == "lds-digits":
        kw = {k: st[k] for k in ("n", "m", "subsets", "alpha", "seed")}
        return digits.lds_digits(**kw, configs=st.get("configs"), log=log)
    if suite == "mislabel-digits":
        kw = {k: st[k] for k in ("n", "m", "flip", "alpha", "seed")}
        return digits.mislabel_digits(**kw, configs=st.get("configs"), log=log)
    model, tok, _ = lm_state
    estimators = tuple(est) if est else lm.ESTIMATORS
    if suite in ("estimators-lm", "lds-lm"):
        train = _records(tok, tasks_dir, st["task"], "train", st["n"])
        val = _records(tok, tasks_dir, st["task"], "validation", st["m"])
    if suite == "lds-lm":
        return lm_lds.lds_lm(model, train, val, st["subsets"], estimators, epochs=st["epochs"],
                             lr=st["lr"], seed=st["seed"], state=partial, log=log)
    if suite == "estimators-lm":
        return lm.estimators_lm(model, train, val, estimators,
                                damping_scale=st["damping_scale"], log=log)
    tr = {t: _records(tok, tasks_dir, t, "train", st["per_task"]) for t in st["tasks"]}
    va = {t: _records(tok, tasks_dir, t, "validation", st["val_per_task"]) for t in st["tasks"]}
    return lm.class_detection(model, tr, va, estimators, log=log)


__all__ = ["SUITES", "QUICK", "DEFAULTS", "settings_for", "run_bench"]
