"""The `layerif` command: one module per command, each a typed config and a `run`.

Order of work in every command: the command line is parsed and every value and input
path checked (argparse, `options`); the config's own checks run (`__post_init__`);
the output is checked and locked (`io.OutputDir` / `io.OutputFile`); only then are
tokenizers, data and models loaded. Every user error prints one line `error: ...` and
exits 2; SIGINT / SIGTERM stop at the next safe point with a message saying what was
kept, and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ..errors import LayerIFError
from . import (allocate, alpha, bench, convert, evaluate, export, finetune, moe, plan,
               prune, run, scores)
from .common import Command, Group, Runtime
from .options import Parser, add_config, config_from

COMMANDS: tuple[Command | Group, ...] = (
    run.COMMAND, finetune.COMMAND, scores.COMMAND, allocate.GROUP, alpha.COMMAND,
    moe.GROUP, prune.COMMAND, evaluate.GROUP, convert.COMMAND, export.COMMAND, bench.COMMAND,
    plan.COMMAND)

_CACHE_ENV = "LAYERIF_COMPILE_CACHE"


def _default_cache() -> str:
    env = os.environ.get(_CACHE_ENV)
    if env:
        return env
    from ..io import user_cache_dir
    return str(user_cache_dir() / "jax-compile")


def _add_runtime(p: argparse.ArgumentParser, top: bool) -> None:
    """-q, --compile-cache, --no-compile-cache: before or after the command name."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no progress bars")
    p.add_argument("--compile-cache", metavar="DIR", default=d(_default_cache()),
                   help=("JAX's persistent compilation cache: a second run skips the "
                         "compilation of the first (default: %(default)s; or "
                         f"${_CACHE_ENV}; 'off' disables it)") if top else argparse.SUPPRESS)
    p.add_argument("--no-compile-cache", action="store_true", default=d(False),
                   help="do not use the persistent compilation cache" if top
                   else argparse.SUPPRESS)
    if not top:   # before the command name only: a command's own --n must stay unambiguous
        return
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes: jax.distributed.initialize() finds the "
                        "others (TPU pods, SLURM, ...); `layerif scores` only")
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="one of several processes, started by hand: process 0's address "
                        "(with --process-count and --process-id)")
    p.add_argument("--process-count", type=_count, metavar="N",
                   help="how many processes take part")
    p.add_argument("--process-id", type=_index, metavar="I",
                   help="this process's number, 0 .. N-1 (0 writes the results)")


def _count(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return int(s)


def _index(s: str) -> int:
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return int(s)


def _distributed(ns, cmd: Command) -> dict | None:
    """jax.distributed.initialize's arguments from the global options, checked (None: a
    single process)."""
    given = [ns.coordinator_address, ns.process_count, ns.process_id]
    if not ns.distributed and all(x is None for x in given):
        return None
    if not cmd.multi_process:
        raise LayerIFError(f"`layerif {cmd.name}` runs as one process; --distributed, "
                           "--coordinator-address, --process-count and --process-id are "
                           "for `layerif scores`")
    if ns.distributed:
        if any(x is not None for x in given):
            raise LayerIFError("give --distributed (the cluster found by JAX) or "
                               "--coordinator-address, --process-count and --process-id, "
                               "not both")
        return {}
    if any(x is None for x in given):
        raise LayerIFError("--coordinator-address, --process-count and --process-id go "
                           "together")
    host, _, port = ns.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise LayerIFError(f"--coordinator-address must be HOST:PORT, got "
                           f"{ns.coordinator_address!r}")
    if ns.process_id >= ns.process_count:
        raise LayerIFError(f"--process-id {ns.process_id} is not below --process-count "
                           f"{ns.process_count}")
    return {"coordinator_address": ns.coordinator_address,
            "num_processes": ns.process_count, "process_id": ns.process_id}


def _start_distributed(kw: dict) -> None:
    import jax
    # CPU processes exchange over gloo (GPUs and TPUs use their own collectives)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:  # noqa: BLE001 - the coordinator's own words
        raise LayerIFError(f"cannot join the other processes: "
                           f"{str(e).strip().splitlines()[0]}") from None


def _add(sub, cmd: Command | Group) -> None:
    if isinstance(cmd, Group):
        g = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        gsub = g.add_subparsers(dest=f"{cmd.name}_command", required=True, metavar="ACTION",
                                parser_class=Parser)
        for c in cmd.commands:
            _add(gsub, c)
        return
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
    add_config(p, cmd.config)
    _add_runtime(p, top=False)
    p.set_defaults(_command=cmd)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="layerif", description=(
        "LayerIF in JAX: layer-wise influence scores for LLMs, and their use for LoRA-MoE "
        "expert allocation and pruning sparsity."))
    _add_runtime(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)
    for cmd in COMMANDS:
        _add(sub, cmd)
    return p


def _use_compile_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at `path` (before jax compiles)."""
    if path is None:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    if "jax" in sys.modules:
        import jax
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"


def _note_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"note: {message}\n")


def main(argv=None) -> int:
    from .. import notes, stop

    ns = build_parser().parse_args(argv)
    cmd: Command = ns._command
    cache = None if ns.no_compile_cache or ns.compile_cache == "off" else ns.compile_cache
    handler = notes.to_stderr()
    old_show = warnings.showwarning
    warnings.showwarning = _note_warning
    try:
        with stop.graceful():
            cfg = config_from(cmd.config, ns)
            dist = _distributed(ns, cmd)
            if dist is not None:
                _start_distributed(dist)
            try:
                _use_compile_cache(cache)
            except OSError as e:
                raise LayerIFError(f"cannot use the compilation cache {cache}: {e.strerror} "
                                   "(--no-compile-cache turns it off)") from None
            cmd.run(cfg, Runtime(progress=not ns.quiet))
            stop.check()  # a signal whose exception some library swallowed still counts
    except LayerIFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except stop.Interrupted as e:
        print(f"stopped by {e.args[0]}: {cmd.stopped}", file=sys.stderr)
        return e.exit_code
    finally:
        warnings.showwarning = old_show
        notes.logger.removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
