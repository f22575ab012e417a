"""How every parameter and the main activations are laid out on a device mesh.

Every parameter of the project's decoders has logical axis names (`logical_axes`, from
its state path: the decoder's layout is one table, `PARAM_AXES`), and ONE table of rules
(`RULES`) maps logical names to the axes of a ("data", "model") mesh:

- "dp": data parallel; every parameter whole on every device, examples split over "data";
- "fsdp": fully sharded data parallel; the model (hidden) dimension of every parameter
  split over "data" as well (XLA gathers each layer's slice where it is used);
- "fsdp_tp": FSDP plus tensor parallelism; heads, kv heads, the MLP's inner dimension
  and the vocabulary split over "model".

Names not in a preset are replicated. Activations carry names too (`constrain`, used for
the residual stream between blocks), constrained only while a sharded program is traced
(`activation_rules`); inside a block XLA propagates the parameters' layout (heads and the
MLP's inner activations split under TP).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import LayerIFError

MESH_AXES = ("data", "model")

# logical axes of each linear map's kernel (d_in, d_out), after the stacked layer axis
LINEAR_AXES = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"),
               "v_proj": ("embed", "kv_heads"), "o_proj": ("heads", "embed"),
               "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
               "down_proj": ("mlp", "embed")}

# the decoder's parameters: regex on the state path -> logical axes ({i}/{o}: the map's
# input / output axis); the first match wins
_LIN = "|".join(LINEAR_AXES)
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed_tokens", ("vocab", "embed")),
    (r"lm_head", ("embed", "vocab")),
    (r"norm", ("norm",)),
    (rf"layers\.({_LIN})\.kernel", ("layers", "{i}", "{o}")),
    (rf"layers\.({_LIN})\.bias", ("layers", "{o}")),
    (rf"layers\.({_LIN})\.lora_a", ("layers", "{i}", "lora_rank")),
    (rf"layers\.({_LIN})\.lora_b", ("layers", "lora_rank", "{o}")),
    (r"layers\.\w*norm", ("layers", "norm")),
)

# logical axis -> mesh axis, per preset (absent: replicated). "batch" is the examples'
# axis; "rows" the rows of one data shard (the engine maps the shards over "data");
# act_embed the residual stream's hidden axis (replicated in every preset).
RULES: dict[str, dict[str, str]] = {
    "dp": {"batch": "data"},
    "fsdp": {"batch": "data", "embed": "data"},
    "fsdp_tp": {"batch": "data", "embed": "data", "heads": "model", "kv_heads": "model",
                "mlp": "model", "vocab": "model"},
}
PRESETS = tuple(RULES)


def check_preset(preset: str) -> str:
    if preset not in RULES:
        raise LayerIFError(f"unknown sharding {preset!r} (choose from {', '.join(PRESETS)})")
    return preset


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axis names of the decoder parameter at `path` (e.g.
    `layers.q_proj.kernel` -> ("layers", "embed", "heads"))."""
    for pattern, axes in PARAM_AXES:
        m = re.fullmatch(pattern, path)
        if m is None:
            continue
        if m.groups():
            i, o = LINEAR_AXES[m.group(1)]
            axes = tuple(i if a == "{i}" else o if a == "{o}" else a for a in axes)
        if len(axes) != ndim:
            # a per-head norm [L, head_dim] or a layer norm [L, hidden]: replicated anyway
            axes = axes[:1] + (None,) * (ndim - 1) if axes[0] == "layers" else (None,) * ndim
        return axes
    raise LayerIFError(f"no logical axes for the parameter {path!r}: sharding presets other "
                       "than 'dp' know the project's decoders only")


def spec(axes: Sequence[str | None], preset: str) -> P:
    """The PartitionSpec of logical `axes` under `preset` (a mesh axis used once)."""
    rules, used, out = RULES[check_preset(preset)], set(), []
    for a in axes:
        ax = rules.get(a) if a is not None else None
        out.append(ax if ax not in used else None)
        used.add(ax)
    return P(*out)


def make_mesh_shape(shape: str) -> tuple[int, int]:
    """"DxM" (e.g. "2x4") -> (D, M)."""
    try:
        out = tuple(int(s) for s in str(shape).lower().split("x"))
    except ValueError:
        out = ()
    if len(out) != 2 or min(out) < 1:
        raise LayerIFError(f"mesh shape must be DATAxMODEL (e.g. 2x4), got {shape!r}")
    return out


def make_mesh(shape="auto", devices=None) -> Mesh:
    """A ("data", "model") mesh: shape (d, m), "DxM" (e.g. "2x4"), or "auto" (every
    device on "data"). Auto axes (jax.make_mesh defaults to Explicit ones)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if shape == "auto":
        shape = (devices.size, 1)
    d, m = make_mesh_shape(shape) if isinstance(shape, str) else shape
    if d < 1 or m < 1 or d * m != devices.size:
        raise LayerIFError(f"a {d}x{m} mesh needs {d * m} devices, there are {devices.size}")
    return Mesh(devices.reshape(d, m), MESH_AXES)


def as_2d(mesh: Mesh) -> Mesh:
    """A 1-D mesh as a (data, model=1) mesh; a ("data", "model") mesh as it is."""
    if mesh.axis_names == MESH_AXES:
        return mesh
    if mesh.devices.ndim == 1:
        return Mesh(mesh.devices.reshape(-1, 1), MESH_AXES)
    raise LayerIFError(f"a 2-D mesh must have the axes {MESH_AXES}, got {mesh.axis_names}")


def check_mesh(mesh: Mesh, preset: str) -> Mesh:
    """A 2-D mesh fit for `preset`: axes ("data", "model"), and a model axis only where
    the preset uses one."""
    shape = "x".join(map(str, mesh.devices.shape))
    as_2d(mesh)   # names its axes when they are not ("data", "model")
    if check_preset(preset) == "dp":
        raise LayerIFError(f"a {shape} mesh needs sharding='fsdp' or 'fsdp_tp' ('dp' splits "
                           "only the examples, over a 1-D mesh)")
    if preset == "fsdp" and mesh.shape["model"] > 1:
        raise LayerIFError(f"a {shape} mesh has a model axis, which only sharding='fsdp_tp' "
                           "uses (with 'fsdp' give a Dx1 mesh)")
    return mesh


def grad_spec(path: str, ndim: int, preset: str) -> P:
    """The PartitionSpec of the per-example gradients of the LoRA parameter at `path`
    (leaves [rows, L, ...] of the parameter's shape): rows over "data", and the
    parameter's own axes over "model" where the preset puts them there (heads, MLP) --
    its "data" axes cannot be, the rows hold that one."""
    rules = RULES[check_preset(preset)]
    axes = logical_axes(path, ndim)
    return P("data", *(("model" if rules.get(a) == "model" else None) for a in axes))


def data_size(mesh: Mesh | None) -> int:
    """How many ways the examples are split: the size of the mesh's data axis."""
    if mesh is None:
        return 1
    return int(mesh.shape["data"]) if "data" in mesh.axis_names else int(mesh.devices.size)


def leaf_paths(tree) -> list[tuple[str, Any]]:
    """[(dotted path, leaf)] of a pytree (a model state), in flatten order."""
    from .influence.partition import path_str
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def sharding_of(path: str, shape: Sequence[int], mesh: Mesh, preset: str) -> NamedSharding:
    """The NamedSharding of the decoder parameter at `path` under `preset`; a dimension
    its mesh axis does not divide is refused, naming both."""
    axes = logical_axes(path, len(shape))
    sp = spec(axes, preset)
    for dim, (name, ax) in enumerate(zip(axes, sp)):
        if ax is not None and shape[dim] % mesh.shape[ax]:
            raise LayerIFError(
                f"{path} dimension {dim} ({name}, size {shape[dim]}) is not divisible "
                f"by the mesh axis {ax!r} (size {mesh.shape[ax]}) of sharding {preset!r}: "
                "choose another mesh shape or sharding")
    return NamedSharding(mesh, sp)


def shardings(tree, mesh: Mesh, preset: str):
    """NamedShardings of a decoder's state (or any part of it), by `preset`."""
    out = [sharding_of(path, tuple(x.shape), mesh, preset) for path, x in leaf_paths(tree)]
    return jax.tree.unflatten(jax.tree.structure(tree), out)


def per_device_bytes(tree) -> int:
    """Bytes of `tree`'s arrays held by one device (the first), summed."""
    dev = None
    total = 0
    for x in jax.tree.leaves(tree):
        shards = x.addressable_shards
        dev = dev or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return total


# -- activations ---------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("layerif_activation_rules",
                                                         default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh | None, preset: str | None):
    """While tracing a sharded program: `constrain` lays activations out by `preset`."""
    token = _ACTIVE.set(None if mesh is None else (mesh, check_preset(preset)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules():
    """(mesh, preset) while `activation_rules` are on, else None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """x laid out by its logical `axes` under the active rules; unchanged outside them.
    (Under `jax.vmap(..., spmd_axis_name="data")` the mapped axis goes to "data".)"""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, preset = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, preset)))
