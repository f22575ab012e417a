"""Influence estimators behind one interface (METHOD.md section 2.2), one file each.

Every estimator turns the validation vectors v (leaves [M, P_k, ...]) into the
preconditioned vectors h ~ v^T (H_b + lambda_b I)^-1, unit by unit; the driver then
scores every training example as score_i = sum over a layer's units of h_b . g_i,b.
An estimator is a (frozen dataclass) class with a `name`, what it needs from the passes
over the training gradients (`extra_passes`, `needs_all_gradients`), the curvatures it
works with (`curvatures`), whether it is damped (`uses_damping`) and
`precondition(ctx)`; optionally `finalize(ctx, unit_scores)`, which rescales the
[n, M, L, U] scores (cosine). `EstimatorBase` holds the defaults, `IterativeSolver` the
damped operator, residual and convergence report of the solvers. `ctx` offers per-unit
products with the run's curvature (`matvec`: the empirical Fisher, or the engine's
Gauss-Newton / Hessian products), per-unit dots and scalings, and `report`, a dict that
lands in the result's meta["estimator_report"]. Options are the dataclass fields.
`@register` adds it to `ESTIMATORS`. Adding one is one file in this folder, named as
the estimator (it is found and imported by that name; the CLI offers it).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import LayerIFError
from ...registry import Registry, import_all
from .. import core
from ..distributed import accumulate, to_host
from ..engines.general import CURVATURES
from ..partition import Partition


@dataclasses.dataclass
class Context:
    """What the first pass over the training set produced, and a way to stream gradients."""
    part: Partition
    n: int                          # real training examples
    v: list[jax.Array]              # validation vectors, leaves [M, P_k, ...]
    sq_u: jax.Array                 # ||g_i,b||^2, [n_pad, L, U] (filler rows are zero)
    vg_u: jax.Array                 # v_m . g_i,b, [n_pad, M, L, U]
    lam: jax.Array                  # damping per unit [L, U]
    chunks: Callable[[], Iterator[tuple[slice, list[jax.Array]]]]  # (rows, leaves [B, P_k, ...])
    kept: bool                      # every gradient is materialised (no recomputation)
    needed_bytes: int = 0           # what keeping every gradient takes
    curvature: str = "empirical_fisher"
    product: Callable | None = None  # x -> sum_i C_i,b x_b per unit, for another curvature
    report: dict = dataclasses.field(default_factory=dict)  # the estimator's diagnostics
    factors: Callable[[], list] | None = None  # K-FAC factors per leaf, from the engine
    # the gradients the curvature is made of where they are not `chunks` (the true
    # Fisher's, at labels drawn from the model, on the packed engine); same rows
    curvature_chunks: Callable[[], Iterator[tuple[slice, list[jax.Array]]]] | None = None

    @functools.cached_property
    def _layer_unit(self) -> tuple[jax.Array, jax.Array]:
        _, layer, unit = self.part.pieces()
        return jnp.asarray(layer), jnp.asarray(unit)

    @functools.cached_property
    def _onehot(self) -> jax.Array:   # made once, not per solver iteration
        return jnp.asarray(self.part.onehot())

    def leaf_view(self, x_LU: jax.Array) -> jax.Array:
        """[..., L, U] -> [..., P]: each piece takes its (layer, unit)'s value."""
        layer, unit = self._layer_unit
        return x_LU[..., layer, unit]

    def weighted_sum(self, coef_nMLU: jax.Array) -> list[jax.Array]:
        """sum_i coef[i, m, l, unit] g_i, one more pass over the gradients."""
        coef_P = self.leaf_view(coef_nMLU)
        acc = None
        for rows, g in self.chunks():
            acc = accumulate(acc, _weighted_sum(coef_P[rows], g))
        return acc


    def unit_dot(self, a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
        """a_m,b . b_m,b per unit: leaves [M, P_k, ...] -> [M, L, U]."""
        return _unit_dot(a, b, self._onehot)

    def scale(self, x: list[jax.Array], s_MLU: jax.Array) -> list[jax.Array]:
        """Each unit's part of x times its scalar: leaves [M, P_k, ...], s [M, L, U]."""
        return _scale(x, jnp.asarray(s_MLU, jnp.float32), *self._layer_unit)

    def axpy(self, y: list[jax.Array], x: list[jax.Array], s_MLU) -> list[jax.Array]:
        """y + s x, each unit's part of x times its scalar s [M, L, U] (one program)."""
        return _axpy(y, x, jnp.asarray(s_MLU, jnp.float32), *self._layer_unit)

    @staticmethod
    def sub(a: list[jax.Array], b: list[jax.Array]) -> list[jax.Array]:
        """a - b leaf by leaf (one program)."""
        return _sub(a, b)

    def matvec(self, x: list[jax.Array]) -> list[jax.Array]:
        """C_b x_b for every unit at once (undamped): the run's curvature, by default
        the empirical Fisher G_b = (1/n) sum_i g_i,b g_i,b^T (one pass over the training
        gradients); the Gauss-Newton or Hessian products come from the engine."""
        if self.product is not None:
            return [a / self.n for a in self.product(x)]
        layer, unit = self._layer_unit
        acc = None
        for _, g in self.chunks():
            acc = accumulate(acc, _fisher_product(g, x, self._onehot, layer, unit))
        return [a / self.n for a in acc]

    def kfac_factors(self, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per leaf (left [P_k, a, a], right [P_k, b, b]) float64, left (x) right ~ the
        run's Fisher of each piece, empirical or true (the engine's `kfac_factors`)."""
        if self.factors is None:
            raise LayerIFError(no_factors(name))
        return self.factors()

    def require_kept(self, name: str, why: str) -> None:
        """Refuse to run when the gradients are not all kept (each of its passes would
        recompute them), naming the budget that keeps them."""
        if not self.kept and self.product is None:
            raise LayerIFError(
                f"estimator {name!r} {why}, so it needs every training gradient kept: raise "
                f"the memory budget to at least {self.needed_bytes / 1e6:.1f} MB")


def no_factors(name: str) -> str:
    return (f"estimator {name!r} needs the input and output gradient of every LoRA map (its "
            "Kronecker factors), which the packed engine measures: run the project's decoders "
            "with engine='packed' (not engine='vmap' or a projection)")


_weighted_sum = jax.jit(core.weighted_sum)


@jax.jit
def _unit_dot(a, b, onehot):
    return core.to_units(core.pair_dots(a, b), onehot)


@jax.jit
def _axpy(y, x, s_MLU, layer, unit):
    """y + s x per unit, every leaf in one program (eagerly: several small programs per
    leaf, which took most of an iterative solver's time on SmolLM2's 420 units)."""
    return [a + b for a, b in zip(y, core.scale_pieces(x, s_MLU[..., layer, unit]))]


@jax.jit
def _scale(x, s_MLU, layer, unit):
    return core.scale_pieces(x, s_MLU[..., layer, unit])


@jax.jit
def _sub(a, b):
    return [x - y for x, y in zip(a, b)]


@jax.jit
def _fisher_product(g, x, onehot, layer, unit):
    d = core.to_units(core.dots(g, x), onehot)          # g_i,b . x_m,b  [B, M, L, U]
    return core.weighted_sum(d[..., layer, unit], g)     # sum_i (g_i . x) g_i  per unit


@dataclasses.dataclass(frozen=True)
class EstimatorBase:
    """The interface's defaults; a subclass sets `name` and writes `precondition`: one
    extra pass over the training gradients, streamed (not all held at once), damped,
    the empirical Fisher only. Options are dataclass fields."""
    name: ClassVar[str]
    extra_passes: ClassVar[int] = 1
    needs_all_gradients: ClassVar[bool] = False
    uses_damping: ClassVar[bool] = True
    needs_factors: ClassVar[bool] = False    # the engine's K-FAC factors (kfac, ekfac)
    curvatures: ClassVar[tuple[str, ...]] = ("empirical_fisher",)


@dataclasses.dataclass(frozen=True)
class IterativeSolver(EstimatorBase):
    """An estimator that solves (C_b + lambda_b I) x_b = v_b from curvature products
    (any curvature), to a relative residual `tol` per unit within `max_iter` steps."""
    curvatures: ClassVar[tuple[str, ...]] = CURVATURES
    tol: float = 1e-5
    max_iter: int = 200

    def damped(self, ctx: "Context") -> Callable[[list[jax.Array]], list[jax.Array]]:
        """x -> (C_b + lambda_b I) x for every unit (leaves [M, P_k, ...])."""
        def apply(x):
            lam = jnp.broadcast_to(ctx.lam, (x[0].shape[0],) + ctx.lam.shape)
            return ctx.axpy(ctx.matvec(x), x, lam)
        return apply

    def residual(self, ctx: "Context", r: list[jax.Array], vnorm: jax.Array,
                 rr: jax.Array | None = None) -> np.ndarray:
        """||r_b|| / ||v_b|| per unit on the host (rr: r . r when already known); 0 where
        v_b is zero."""
        rr = ctx.unit_dot(r, r) if rr is None else rr
        return to_host(core.safe_div(jnp.sqrt(rr), vnorm), np.float64)

    def finish(self, ctx: "Context", rel: np.ndarray, iters: int, **report) -> None:
        """Record the run in ctx.report; raise, naming the worst unit, if it fell short."""
        ctx.report.update(iterations=iters, max_relative_residual=float(rel.max()), **report)
        if rel.max() > self.tol:
            m, l, u = np.unravel_index(int(np.argmax(rel)), rel.shape)
            raise LayerIFError(
                f"{self.name} did not converge in {iters} iterations: relative residual "
                f"{rel.max():.2e} (tol {self.tol:g}) at {ctx.part.describe(int(l), int(u))}; "
                "raise max_iter or the damping")


class Estimator(Protocol):
    name: str
    extra_passes: int            # passes over the training gradients after the first
    needs_all_gradients: bool    # holds every training gradient of a unit at once

    def precondition(self, ctx: Context) -> list[jax.Array] | None:
        """h leaves [M, P_k, ...], or None for h = v (scores are then v . g, already known)."""


_REGISTRY = Registry("estimator")
ESTIMATORS: dict[str, type] = _REGISTRY.classes


def register(cls):
    """Class decorator: make an estimator available by its `name` (the built-in ones: the
    module name is the estimator's name, so the CLI lists them without importing them)."""
    return _REGISTRY.register(cls)


def get_estimator(name: str, **options) -> Estimator:
    """An estimator by name; options it does not take are refused, naming those it does."""
    return _REGISTRY.get(name, **options)


def to_jnp(xs) -> list[jax.Array]:
    return [jnp.asarray(x, jnp.float32) for x in xs]


import_all(__name__, Path(__file__).parent)  # every module here registers its estimator
from .datainf import DataInf  # noqa: E402
from .exact import Exact  # noqa: E402
from .identity import Identity  # noqa: E402

__all__ = ["Context", "Estimator", "EstimatorBase", "IterativeSolver", "ESTIMATORS", "register",
           "get_estimator", "no_factors", "DataInf",
           "Exact", "Identity"]
