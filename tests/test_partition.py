"""layerif_jax.influence.partition: what a layer, a unit and a piece are, on pytrees
whose layers, units and sizes are written out by hand."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from layerif_jax.errors import LayerIFError
from layerif_jax.influence.partition import make_partition, path_str

# two layers of a per-layer model plus a head nobody attributes; layer 1 lacks "mlp"
PER_LAYER = {
    "layers": [
        {"attn": {"lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 3))},
         "mlp": {"lora_a": np.zeros((4, 1)), "lora_b": np.zeros((1, 5))}},
        {"attn": {"lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 3))}},
    ],
    "head": np.zeros((3, 3)),
}


def test_path_str_of_dicts_lists_and_nnx():
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(PER_LAYER)[0]]
    assert paths == ["head", "layers.0.attn.lora_a", "layers.0.attn.lora_b",
                     "layers.0.mlp.lora_a", "layers.0.mlp.lora_b",
                     "layers.1.attn.lora_a", "layers.1.attn.lora_b"]

    class Net(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([nnx.LoRA(3, 2, 4, rngs=nnx.Rngs(0)) for _ in range(2)])

    state = nnx.state(Net(), nnx.LoRAParam)
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert names == ["blocks.0.lora_a", "blocks.0.lora_b", "blocks.1.lora_a", "blocks.1.lora_b"]


@pytest.mark.parametrize("layer_of", [
    r"layers\.(\d+)\.",
    lambda p: int(p.split(".")[1]) if p.startswith("layers.") else None,
])
def test_tensor_units_by_regex_and_callable(layer_of):
    part = make_partition(PER_LAYER, unit="tensor", layer_of=layer_of)
    assert part.leaf_names == ("layers.0.attn.lora_a", "layers.0.attn.lora_b",
                               "layers.0.mlp.lora_a", "layers.0.mlp.lora_b",
                               "layers.1.attn.lora_a", "layers.1.attn.lora_b")
    assert part.leaf_index == (1, 2, 3, 4, 5, 6)          # the head (leaf 0) is left out
    assert part.layer_ids == (0, 1) and part.num_layers == 2
    # the same tensor of two layers is one unit name: its path without the layer number
    assert part.unit_names == ("layers.attn.lora_a", "layers.attn.lora_b",
                               "layers.mlp.lora_a", "layers.mlp.lora_b")
    np.testing.assert_array_equal(part.sizes(), [[8, 6, 4, 5], [8, 6, 0, 0]])
    oh = part.onehot()
    assert oh.shape == (6, 2, 4) and (oh.sum((1, 2)) == 1).all()
    assert [tuple(np.argwhere(o)[0]) for o in oh] == [(0, 0), (0, 1), (0, 2), (0, 3),
                                                      (1, 0), (1, 1)]
    assert part.describe(1, 1) == "layer 1 unit layers.attn.lora_b"


def test_module_and_block_units():
    mod = make_partition(PER_LAYER, unit="module", layer_of=r"layers\.(\d+)\.")
    assert mod.unit_names == ("layers.attn", "layers.mlp")
    np.testing.assert_array_equal(mod.sizes(), [[14, 9], [14, 0]])
    blk = make_partition(PER_LAYER, unit="block", layer_of=r"layers\.(\d+)\.")
    assert blk.unit_names == ("block",)
    np.testing.assert_array_equal(blk.sizes(), [[23], [14]])


def test_layer_ids_keep_the_models_numbers():
    sparse = {"layers": {"3": {"w": np.zeros(2)}, "11": {"w": np.zeros(5)}}}
    part = make_partition(sparse, layer_of=r"layers\.(\d+)\.")
    assert part.layer_ids == (3, 11)                     # sorted numerically, not as text
    np.testing.assert_array_equal(part.sizes(), [[2], [5]])


def test_stacked_leaves_have_one_piece_per_layer():
    stacked = {"q": {"lora_a": np.zeros((3, 4, 2)), "lora_b": np.zeros((3, 2, 6))},
               "v": {"lora_a": np.zeros((3, 4, 2)), "lora_b": np.zeros((3, 2, 4))}}
    part = make_partition(stacked, unit="module")
    assert part.layer_ids == (0, 1, 2) and part.num_pieces == 12
    assert part.leaf_stacked == (True,) * 4
    assert part.unit_names == ("q", "v")
    np.testing.assert_array_equal(part.sizes(), [[20, 16]] * 3)
    leaf, layer, unit = part.pieces()
    assert leaf.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert layer.tolist() == [0, 1, 2] * 4 and unit.tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("params, kw, match", [
    ({}, {}, "no parameters to attribute"),
    (PER_LAYER, {"unit": "row"}, "unknown unit 'row'"),
    (PER_LAYER, {}, "needs a leading layer axis on every leaf"),
    (PER_LAYER, {"layer_of": r"layers\.\d+\."}, "exactly one group"),
    (PER_LAYER, {"layer_of": r"layers\.(\d+"}, "is invalid"),
    (PER_LAYER, {"layer_of": r"(attn)"}, "not an integer"),
    (PER_LAYER, {"layer_of": r"blocks\.(\d+)\."}, "attributes no parameter"),
    (PER_LAYER, {"layer_of": 3}, "must be a regex, a callable or 'stacked'"),
])
def test_partition_errors(params, kw, match):
    with pytest.raises(LayerIFError, match=match):
        make_partition(params, **kw)
