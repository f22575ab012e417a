"""Kronecker-factored random projection of per-example gradients of FULL weights (LoGra).

For a linear map y = x W (W [I, O], frozen or not; a LoRA on it is folded into the
forward) example e's gradient is G_e = sum_{t in e} x_t^T dy_t [I, O]. Projected from both
sides by fixed Gaussian matrices P_I [I, k_in], P_O [O, k_out] (entries N(0, 1/k), so that
E[<P_I^T G P_O, P_I^T G' P_O>] = <G, G'>):

    P_I^T G_e P_O = sum_{t in e} (x_t P_I)^T (dy_t P_O)            [k_in, k_out]

which needs only the projected input x P_I and output gradient dy P_O of each token: the
[I, O] per-example gradient is never formed. It runs in the packed engine's backward, per
layer, as the segment sum of the LoRA gradients does (`kernels.segment_grads`), for every
linear map of every block of the project's decoders; P_I and P_O are drawn from `seed`,
the map and the layer inside the compiled call (`kron_projections`: never stored), the
same for training and validation examples. Every estimator that works on per-example
gradients (the empirical Fisher) then runs in the projected space: one leaf
[L, k_in, k_out] per map, so the model needs no LoRA at all.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...kernels import segment_grads

from ...errors import LayerIFError
from ...ops import mm, precision, target_platform
from .packed import PackedEngine, fold_lora, packed_loss, to_slots, build_fn


def parse_kron(spec) -> tuple[int, int] | None:
    """"kron:K" or "kron:KINxKOUT" -> (k_in, k_out); anything else not a "kron" spec: None."""
    if not (isinstance(spec, str) and spec.lower().startswith("kron")):
        return None
    body = spec.split(":", 1)[1] if ":" in spec else ""
    try:
        ks = [int(x) for x in body.lower().split("x")]
    except ValueError:
        ks = []
    if len(ks) not in (1, 2) or min(ks) < 1:
        raise LayerIFError(f"a Kronecker projection is 'kron:K' or 'kron:KINxKOUT' with "
                           f"positive integers, got {spec!r}")
    return (ks[0], ks[-1])


def kron_projections(seed: int, maps: dict[str, tuple[int, int]], layers: int,
                     k_in: int, k_out: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{map: (P_I [L, I, k_in], P_O [L, O, k_out])}, Gaussian with variance 1/k, drawn
    from the seed and the map's place in sorted order (a pure function: the engine makes
    them inside its compiled call, a test outside)."""
    key = jax.random.key(seed)
    out = {}
    for i, name in enumerate(sorted(maps)):
        d_in, d_out = maps[name]
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out[name] = (jax.random.normal(k1, (layers, d_in, k_in)) / np.sqrt(k_in),
                     jax.random.normal(k2, (layers, d_out, k_out)) / np.sqrt(k_out))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def kron_linears(x, kernels, probes, seg_RT, dtype, per_row: int) -> tuple:
    """The linear maps sharing the input x [R, T, I] as ONE GEMM against the concatenated
    kernels (each [I, O_m], LoRA already folded in): a tuple of y_m. probes: per map (pC
    [R*J, k_in, k_out] zeros, P_I [I, k_in], P_O [O_m, k_out]); the cotangent of pC is
    every example position's projected gradient sum_{t in e} (x_t P_I)^T (dy_t P_O).
    Differentiable with respect to x and the probes only."""
    return _kron_fwd(x, kernels, probes, seg_RT, dtype, per_row)[0]


def _kron_fwd(x, kernels, probes, seg_RT, dtype, per_row):
    y = mm(x, jnp.concatenate([k.astype(dtype) for k in kernels], 1))
    sizes = [k.shape[-1] for k in kernels]
    ys = tuple(jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1))
    return ys, (x, kernels, probes, seg_RT)


def _kron_bwd(dtype, per_row, res, dys):
    x, kernels, probes, seg = res
    dx = mm(jnp.concatenate([dy.astype(dtype) for dy in dys], -1),
            jnp.concatenate([k.astype(dtype) for k in kernels], 1).T)
    prec = precision()
    xf = x.astype(jnp.float32)
    out = []
    for dy, (pc, p_in, p_out) in zip(dys, probes):
        xp = jnp.einsum("rti,ik->rtk", xf, p_in, precision=prec)
        dyp = jnp.einsum("rto,ok->rtk", dy.astype(jnp.float32), p_out, precision=prec)
        g = segment_grads.segment_outer(seg, xp, dyp, per_row, platform=target_platform(),
                                        precision=prec)                     # [R, J, ki, ko]
        out.append((g.reshape(pc.shape), jnp.zeros_like(p_in), jnp.zeros_like(p_out)))
    return (dx, jax.tree.map(jnp.zeros_like, kernels), tuple(out),
            np.zeros(seg.shape, jax.dtypes.float0))


kron_linears.defvjp(_kron_fwd, _kron_bwd)


def kron_group_fn(scales: dict[str, float], seg_RT, per_row: int, dtype):
    """The decoder's `group_fn` hook: every linear map of a group as one probed GEMM (a
    LoRA on it folded into the kernel with its scale)."""
    def fn(p, probes, names, h):
        kernels = tuple(fold_lora(p[n]["kernel"], p[n]["lora_a"], p[n]["lora_b"], scales[n], dtype)
                        if "lora_a" in p[n] else p[n]["kernel"] for n in names)
        ys = kron_linears(h, kernels, tuple(probes[n] for n in names), seg_RT, dtype, per_row)
        return tuple(y + p[n]["bias"].astype(y.dtype) if "bias" in p[n] else y
                     for n, y in zip(names, ys))
    return fn


def kron_grad_fn(graphdef, *, slots: int, per_row: int, dtype, maps: dict[str, tuple],
                 k_in: int, k_out: int, seed: int):
    """(lora, rest, ids, segments, positions, targets, slot_pos) -> (projected gradient
    leaves [E, L, k_in, k_out], one per map in sorted order, finite_E), as
    `packed.packed_grad_fn` gives the LoRA ones."""
    names = sorted(maps)

    def fn(lora, rest, ids_RT, seg_RT, pos_RT, tgt_RT, slot_pos_E):
        model = nnx.merge(graphdef, lora, rest)
        L, RJ = model.cfg.num_layers, ids_RT.shape[0] * per_row
        proj = kron_projections(seed, maps, L, k_in, k_out)
        probes = {n: (jnp.zeros((L, RJ, k_in, k_out)), *proj[n]) for n in names}
        scales = {n: float(s) for n, (*_, s) in model.packed_lora().items()}
        group_fn = kron_group_fn(scales, seg_RT, per_row, dtype or model.dtype)
        g = jax.grad(packed_loss(model, ids_RT, seg_RT, pos_RT, tgt_RT, per_row, dtype,
                                  group_fn))(probes)
        leaves = [to_slots(g[n][0], slot_pos_E) for n in names]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x.reshape(slots, -1)), axis=1)
                                    for x in leaves]), axis=0)
        return leaves, finite

    return fn


class KronEngine(PackedEngine):
    """The packed engine on the Kronecker-projected gradients of every linear map's full
    weight (see the module docstring); data parallel only. Its "parameters" for the
    partition are `projected` ({"layers": {map: {"kernel": [L, k_in, k_out]}}})."""

    name = "packed+kronecker"
    grads_and_factors = None    # no K-FAC factors of the projected space
    scores = None               # the score pass dots the projected gradients

    def __init__(self, model, *, k_in: int, k_out: int, seed: int = 0, **kw):
        if kw.get("sharding", "dp") != "dp":
            raise LayerIFError("a Kronecker projection runs data parallel (sharding='dp')")
        super().__init__(model, **kw)
        self.k_in, self.k_out, self.seed = int(k_in), int(k_out), int(seed)
        lins = model.layers.linears()
        self.maps = {n: tuple(lin.kernel.shape[1:]) for n, lin in lins.items()}
        L = model.cfg.num_layers
        self.projected = {"layers": {n: {"kernel": jax.ShapeDtypeStruct(
            (L, self.k_in, self.k_out), jnp.float32)} for n in sorted(self.maps)}}

    def plan(self, example_sets) -> None:
        super().plan(example_sets)
        inner = kron_grad_fn(self.graphdef, slots=self.slots_local, per_row=self.per_row,
                             dtype=self.dtype, maps=self.maps, k_in=self.k_in,
                             k_out=self.k_out, seed=self.seed)
        self.fn = build_fn(self.graphdef, self.dtype, self.slots_local, self.per_row,
                           self.mesh, remat=self.remat, inner=inner)

    def direct_scores(self, M: int) -> bool:
        return False

    def grad_layout(self, g):
        return g

    def describe(self, calls) -> dict[str, Any]:
        return {**super().describe(calls), "projection": f"kron:{self.k_in}x{self.k_out}",
                "projection_seed": self.seed}
