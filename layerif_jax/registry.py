"""Named, pluggable implementations (estimators, pruners): a class per name, options as
its dataclass fields, built-in ones discovered as the modules of a folder."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

from .errors import LayerIFError


class Registry:
    """`register` (a class decorator) adds a class by its `name`; `get(name, **options)`
    builds one, refusing options it does not declare."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    def register(self, cls):
        self.classes[cls.name] = cls
        return cls

    def cls(self, name: str) -> type:
        if name not in self.classes:
            raise LayerIFError(f"unknown {self.kind} {name!r} (choose from "
                               f"{', '.join(self.classes)})")
        return self.classes[name]

    def options(self, name: str) -> set[str]:
        cls = self.cls(name)
        return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()

    def get(self, name: str, **options):
        fields = self.options(name)
        bad = sorted(set(options) - fields)
        if bad:
            raise LayerIFError(f"{self.kind} {name!r} has no option {', '.join(map(repr, bad))} "
                               f"(its options: {', '.join(sorted(fields)) or 'none'})")
        return self.cls(name)(**options)


def module_names(folder: Path) -> tuple[str, ...]:
    """The public modules of a folder, read from the file system (nothing is imported, so
    the CLI can offer them as choices without importing jax)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                        if not m.name.startswith("_")))


def import_all(package: str, folder: Path) -> None:
    """Import every public module of a package folder (each registers what it defines)."""
    for name in module_names(folder):
        importlib.import_module(f"{package}.{name}")
