"""Typed command configurations, and the argparse parser built from them.

Every option of a command is a field of that command's frozen dataclass, declared once
with `opt(default, help, ...)`: its flag, its parser (`type`), its choices and its help
text, to which the default is appended. `add_config` turns a dataclass into parser
arguments and `config_from` turns the parsed namespace back into the dataclass; no
argparse Namespace goes any further. Only the standard library is imported here, so
`layerif --help` does not wait for jax.

Parsers in this file run while the command line is parsed: a wrong value or a missing
input file is reported (one line, exit 2) before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

class _Required:
    """The default of a required option or positional."""

    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


def opt(default=REQUIRED, help: str = "", *, type: Callable[[str], Any] | None = None,
        choices: Sequence[str] | None = None, flag: str | None = None, short: str | None = None,
        metavar: str | None = None, positional: bool = False, nargs: str | None = None,
        shown: str | None = None, cli: bool = True, const: Any = None):
    """A config field that is also a command-line option.

    `shown`: how the default reads in --help (default: the value itself). Booleans
    with default False become switches. `cli=False`: a setting of the library call
    that the command line does not offer. `const` with nargs="?": the value of the option
    given without one.
    """
    meta = dict(help=help, type=type, choices=tuple(choices) if choices else None, flag=flag,
                short=short, metavar=metavar, positional=positional, nargs=nargs, shown=shown,
                cli=cli, const=const)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"cli": meta})
    return dataclasses.field(default=default, metadata={"cli": meta})


def _help(f: dataclasses.Field, meta: dict) -> str:
    text = meta["help"]
    if f.default is REQUIRED:
        return text
    if f.default is False and meta["type"] is None:
        return text  # a switch
    shown = meta["shown"] if meta["shown"] is not None else _show(f.default)
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def add_config(parser: argparse.ArgumentParser, cls) -> None:
    """Add one argument per CLI field of the dataclass `cls`."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        if meta is None or not meta["cli"]:
            continue
        kw: dict[str, Any] = {"help": _help(f, meta)}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["nargs"]:
            kw["nargs"] = meta["nargs"]
        if meta.get("const") is not None:
            kw["const"] = meta["const"]
        if meta["positional"]:
            if meta["type"]:
                kw["type"] = meta["type"]
            parser.add_argument(f.name, **kw)
            continue
        names = [meta["flag"] or "--" + f.name.replace("_", "-")]
        if meta["short"]:
            names.insert(0, meta["short"])
        if f.default is False and meta["type"] is None:
            parser.add_argument(*names, dest=f.name, action="store_true", **kw)
            continue
        if meta["type"]:
            kw["type"] = meta["type"]
        if f.default is REQUIRED:
            kw["required"] = True
        elif f.default is dataclasses.MISSING:        # a list: a fresh default each parse
            kw["default"] = f.default_factory()
        else:
            kw["default"] = f.default
        parser.add_argument(*names, dest=f.name, **kw)


def config_from(cls, ns: argparse.Namespace):
    """The dataclass `cls` from the parsed arguments (fields not on the command line keep
    their defaults)."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
             if f.init and hasattr(ns, f.name)}
    return cls(**given)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: layerif scores: argument --lr: ...`."""

    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# -- value parsers (run while parsing) ----------------------------------------------------

def _number(kind, s: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def _bounded(kind, holds, rule: str, name: str):
    """An argparse type: a finite number of `kind` for which `holds(v)`, else "must be
    {rule}"."""
    def parse(s: str):
        v = _number(kind, s)
        if not holds(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {v}")
        return v
    parse.__name__ = parse.__qualname__ = name  # argparse names the type in its errors
    return parse


positive_int = _bounded(int, lambda v: v >= 1, ">= 1", "positive_int")
nonneg_int = _bounded(int, lambda v: v >= 0, ">= 0", "nonneg_int")
positive_float = _bounded(float, lambda v: v > 0, "> 0", "positive_float")
nonneg_float = _bounded(float, lambda v: v >= 0, ">= 0", "nonneg_float")


def key_value(s: str) -> tuple[str, Any]:
    """NAME=VALUE; the value read as JSON (1e-3, 40, true) or else kept as text."""
    import json

    key, sep, raw = s.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def number(s: str) -> float:
    return _number(float, s)


def fraction(s: str) -> float:
    """A number strictly between 0 and 1."""
    v = _number(float, s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def unit_interval(s: str) -> float:
    """A number in [0, 1)."""
    v = _number(float, s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def byte_size(s: str) -> str:
    from ..errors import LayerIFError
    from ..io import parse_bytes
    try:
        parse_bytes(s, "size")
    except LayerIFError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def _readable(p: Path, what: str) -> None:
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{what} not found: {p}")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{what} not readable: {p}")


def input_file(what: str = "file") -> Callable[[str], str]:
    """An existing, readable file."""
    def check(s: str) -> str:
        p = Path(s).expanduser()
        _readable(p, what)
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{p} is a directory, expected a {what}")
        return str(p)
    check.__name__ = what.replace(" ", "_")
    return check


def input_path(what: str = "path") -> Callable[[str], str]:
    """An existing, readable file or directory."""
    def check(s: str) -> str:
        p = Path(s).expanduser()
        _readable(p, what)
        return str(p)
    check.__name__ = what.replace(" ", "_")
    return check


def output_path(s: str) -> str:
    """Where to write: not checked here beyond being non-empty (the command locks it and
    checks it before loading anything)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("empty path")
    return str(Path(s).expanduser())


model_path = input_path("model")
data_file = input_file("data file")
