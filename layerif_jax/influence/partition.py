"""THE place that decides what a layer, a unit of inversion and a module are.

Parameters are any pytree. Every leaf is named by its path written with dots
(`layers.3.attn.q.lora_a`; an NNX Variable's trailing `.value` is dropped), and
`layer_of` says which layer (transformer block) it belongs to:

- a regex with one integer group, searched in the path (`r"layers\\.(\\d+)\\."`);
- a callable `path -> int | None` (None: the leaf is not attributed to any layer);
- "stacked": every leaf has a leading layer axis (the project's decoders stack their
  blocks), so index l of axis 0 is layer l.

Leaves no layer claims are not attributed: they keep their values and get no gradient.

Inside a layer the leaves are grouped into units, each with its own damped inverse:

- "tensor" (default, as DataInf): every leaf (each LoRA A and B) is a unit;
- "module": the leaves of one module (A and B of one linear map) together;
- "block": the whole layer is one unit.

A unit's name is its path with the layer index taken out, so the "same" unit of two
layers shares a name. A *piece* is one layer's part of one leaf: a stacked leaf has L
pieces, any other leaf one. Per-example quantities are reduced piece by piece into
[..., P] and summed into [..., L, U] with one matrix product (`onehot`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from ..errors import LayerIFError

UNITS = ("tensor", "module", "block")


def path_str(path) -> str:
    """A pytree path written with dots, e.g. `layers.3.attn.lora_a` (`.value` dropped)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class Partition:
    leaf_names: tuple[str, ...]            # dotted paths of the attributed leaves, flatten order
    leaf_index: tuple[int, ...]            # position of each among ALL the leaves of the pytree
    leaf_layers: tuple[tuple[int, ...], ...]  # layer (0..L-1) of each piece of each leaf
    leaf_stacked: tuple[bool, ...]         # the leaf has a leading layer axis
    leaf_unit: tuple[int, ...]             # unit of each leaf
    leaf_piece_size: tuple[int, ...]       # parameters in one piece of the leaf
    unit_names: tuple[str, ...]
    layer_ids: tuple[Any, ...]             # the model's own layer numbers, in order
    unit: str

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @property
    def num_pieces(self) -> int:
        return sum(len(ls) for ls in self.leaf_layers)

    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf, layer, unit) of every piece, [P] each, in leaf order."""
        leaf = np.concatenate([[k] * len(ls) for k, ls in enumerate(self.leaf_layers)])
        layer = np.concatenate([ls for ls in self.leaf_layers])
        return leaf.astype(int), layer.astype(int), np.asarray(self.leaf_unit)[leaf.astype(int)]

    def sizes(self) -> np.ndarray:
        """[L, U] parameters per unit of every layer (0 where the layer lacks the unit)."""
        out = np.zeros((self.num_layers, self.num_units), np.int64)
        leaf, layer, unit = self.pieces()
        np.add.at(out, (layer, unit), np.asarray(self.leaf_piece_size)[leaf])
        return out

    def onehot(self) -> np.ndarray:
        """[P, L, U] 0/1: piece -> (layer, unit)."""
        _, layer, unit = self.pieces()
        m = np.zeros((self.num_pieces, self.num_layers, self.num_units), np.float32)
        m[np.arange(self.num_pieces), layer, unit] = 1.0
        return m

    def describe(self, layer: int, unit: int) -> str:
        return f"layer {self.layer_ids[layer]} unit {self.unit_names[unit]}"


def _layer_fn(layer_of) -> Callable[[str], tuple[Any, str] | None]:
    """path -> (layer id, unit name) or None, for a regex or a callable."""
    if isinstance(layer_of, str):
        try:
            pat = re.compile(layer_of)
        except re.error as e:
            raise LayerIFError(f"layer_of regex {layer_of!r} is invalid: {e}") from None
        if pat.groups != 1:
            raise LayerIFError(f"layer_of regex {layer_of!r} needs exactly one group (the "
                               "layer number), e.g. r'layers\\.(\\d+)\\.'")

        def by_regex(path):
            m = pat.search(path)
            if m is None:
                return None
            try:
                layer = int(m.group(1))
            except ValueError:
                raise LayerIFError(f"layer_of regex {layer_of!r} matched {m.group(1)!r} in "
                                   f"{path}, not an integer") from None
            return layer, _strip(path, m.start(1), m.end(1))
        return by_regex
    if callable(layer_of):
        def by_call(path):
            layer = layer_of(path)
            if layer is None:
                return None
            parts = path.split(".")
            if str(layer) in parts:
                i = parts.index(str(layer))
                return layer, ".".join(parts[:i] + parts[i + 1:])
            return layer, path
        return by_call
    raise LayerIFError(f"layer_of must be a regex, a callable or 'stacked', got {layer_of!r}")


def _strip(path: str, a: int, b: int) -> str:
    return re.sub(r"\.\.+", ".", (path[:a] + path[b:])).strip(".")


def make_partition(params, unit: str = "tensor", layer_of="stacked") -> Partition:
    """The partition of a pytree of parameters (see the module docstring)."""
    if unit not in UNITS:
        raise LayerIFError(f"unknown unit {unit!r} (choose from {', '.join(UNITS)})")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise LayerIFError("no parameters to attribute (for a LoRA model: attach or load an "
                           "adapter first)")
    names, index, layers, stacked, piece_size, keys = [], [], [], [], [], []
    if layer_of == "stacked":
        L = int(np.shape(flat[0][1])[0]) if np.ndim(flat[0][1]) else 0
        for i, (p, x) in enumerate(flat):
            shape = tuple(np.shape(x))
            if not shape or shape[0] != L:
                raise LayerIFError(
                    f"layer_of='stacked' needs a leading layer axis on every leaf; "
                    f"{path_str(p)} has shape {shape}, the first leaf {L} layers (give "
                    "layer_of as a regex or a callable for per-layer leaves)")
            names.append(path_str(p))
            index.append(i)
            layers.append(tuple(range(L)))
            stacked.append(True)
            piece_size.append(int(np.prod(shape[1:])))
            keys.append(names[-1])
        ids = tuple(range(L))
    else:
        fn = _layer_fn(layer_of)
        found = []
        for i, (p, x) in enumerate(flat):
            name = path_str(p)
            got = fn(name)
            if got is not None:
                found.append((i, name, got[0], got[1], int(np.prod(np.shape(x)))))
        if not found:
            raise LayerIFError(f"layer_of {layer_of!r} attributes no parameter to a layer "
                               f"(paths look like {path_str(flat[0][0])!r})")
        ids = tuple(sorted({f[2] for f in found}))
        pos = {lid: j for j, lid in enumerate(ids)}
        for i, name, lid, key, size in found:
            names.append(name)
            index.append(i)
            layers.append((pos[lid],))
            stacked.append(False)
            piece_size.append(size)
            keys.append(key)
    if unit == "tensor":
        groups = keys
    elif unit == "module":
        groups = [k.rsplit(".", 1)[0] if "." in k else k for k in keys]
    else:
        groups = ["block"] * len(keys)
    unit_names = tuple(dict.fromkeys(groups))
    return Partition(tuple(names), tuple(index), tuple(layers), tuple(stacked),
                     tuple(unit_names.index(g) for g in groups), tuple(piece_size),
                     unit_names, ids, unit)
