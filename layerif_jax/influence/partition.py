"""THE place that decides what a layer is and what a unit of inversion is.

Every LoRA leaf of the model is stacked over the L transformer blocks (leading
axis, see model/decoder.py), so "layer l" is index l of axis 0 of every LoRA
leaf: a layer is one decoder block, attention + MLP.

Inside a layer, the LoRA leaves are grouped into units of inversion, each with its
own damped inverse:

- "tensor" (default, as DataInf): every A and every B of every module is a unit;
- "module": A and B of one linear map together;
- "block": the whole layer is one unit.

Per-example quantities are reduced leaf by leaf to arrays [..., L, num_leaves]
and then summed into units with one matrix product (`to_units`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..errors import LayerIFError

UNITS = ("tensor", "module", "block")


@dataclasses.dataclass(frozen=True)
class Partition:
    leaf_names: tuple[str, ...]     # e.g. "q_proj.lora_a", in jax.tree flatten order
    leaf_unit: tuple[int, ...]      # unit index (within a layer) of each leaf
    unit_names: tuple[str, ...]
    unit_sizes: tuple[int, ...]     # parameters per unit in ONE layer
    num_layers: int
    unit: str

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    def onehot(self) -> np.ndarray:
        """[num_leaves, num_units] 0/1 matrix: leaf -> unit."""
        m = np.zeros((len(self.leaf_names), self.num_units), np.float32)
        m[np.arange(len(self.leaf_names)), self.leaf_unit] = 1.0
        return m

    def describe(self, layer: int, unit: int) -> str:
        return f"layer {layer} unit {self.unit_names[unit]}"


def _leaf_name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    keys = [k for k in keys if k not in ("layers", "value", "raw_value")]
    return ".".join(keys)


def make_partition(lora_state, unit: str = "tensor") -> Partition:
    """Partition of an `nnx.State` (or any pytree) of stacked LoRA leaves [L, ...]."""
    if unit not in UNITS:
        raise LayerIFError(f"unknown unit {unit!r} (choose from {', '.join(UNITS)})")
    flat, _ = jax.tree_util.tree_flatten_with_path(lora_state)
    if not flat:
        raise LayerIFError("the model has no LoRA parameters: attach or load an adapter first")
    names = tuple(_leaf_name(p) for p, _ in flat)
    shapes = [tuple(x.shape) for _, x in flat]
    num_layers = shapes[0][0]
    if any(s[0] != num_layers for s in shapes):
        raise LayerIFError("LoRA leaves do not share one leading layer axis")
    if unit == "tensor":
        groups = list(names)
    elif unit == "module":
        groups = [n.rsplit(".", 1)[0] for n in names]
    else:
        groups = ["block"] * len(names)
    unit_names = tuple(dict.fromkeys(groups))
    leaf_unit = tuple(unit_names.index(g) for g in groups)
    sizes = [0] * len(unit_names)
    for u, s in zip(leaf_unit, shapes):
        sizes[u] += int(np.prod(s[1:]))
    return Partition(names, leaf_unit, unit_names, tuple(sizes), num_layers, unit)
