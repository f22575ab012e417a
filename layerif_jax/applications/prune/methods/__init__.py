"""Pruners, one file each, by name (METHOD.md section 5).

A pruner is a (frozen dataclass) class with

- `name` (the built-in ones: the module name, so the CLI lists them without importing);
- `calibration`: what it needs of each matrix's input over the calibration tokens --
  None (the weights alone), "sq" (per input feature, the sum of x^2) or "xtx" (the Gram
  matrix X^T X);
- `default_epsilon`: LayerIF's epsilon for it (METHOD.md: 0.3 magnitude, 0.1 otherwise);
- `check(nm)`: refuse options that cannot work with an N:M pattern, before any work;
- `prune(W, sparsity, nm, stats, n_tok) -> (W_new, masked, zeros, expected)`: one kernel
  W [d_in, d_out] pruned to `sparsity` (or N:M), `stats` the input statistics it asked
  for; `expected` is how many weights its mask must remove (checked by the caller).

Its options are its dataclass fields (`get_pruner("sparsegpt", blocksize=64)`).
`@register_pruner` adds it; adding one is one file in this folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Protocol

from ....registry import Registry, import_all

__all__ = ["Pruner", "PrunerBase", "PRUNERS", "register_pruner", "get_pruner", "pruner_options",
           "nm_count"]


class Pruner(Protocol):
    name: str
    calibration: str | None
    default_epsilon: float

    def check(self, nm: tuple[int, int] | None) -> None: ...

    def prune(self, W, sparsity: float, nm, stats, n_tok: int): ...


@dataclasses.dataclass(frozen=True)
class PrunerBase:
    """The interface's defaults: a pruner with no option an N:M pattern can contradict
    (`check` accepts every nm); a subclass sets name, calibration, default_epsilon and
    writes `prune`."""
    name: ClassVar[str]
    calibration: ClassVar[str | None] = None
    default_epsilon: ClassVar[float] = 0.1

    def check(self, nm: tuple[int, int] | None) -> None:
        return None


_REGISTRY = Registry("pruning method")
PRUNERS: dict[str, type] = _REGISTRY.classes


def register_pruner(cls):
    """Class decorator: make a pruner available by its `name`."""
    return _REGISTRY.register(cls)


def get_pruner(name: str, **options) -> Pruner:
    """A pruner by name; options it does not take are refused, naming those it does."""
    return _REGISTRY.get(name, **options)


def pruner_options(name: str) -> set[str]:
    return _REGISTRY.options(name)


def nm_count(W, nm) -> int:
    """Weights an N:M mask removes from W."""
    return W.size * nm[0] // nm[1]


import_all(__name__, Path(__file__).parent)  # noqa: E402  every module registers its pruner
