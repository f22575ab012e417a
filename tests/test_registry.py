"""layerif_jax.registry: estimators and pruners are found by name, one module each, and a
user's own pruner or estimator plugs in without touching the package."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from layerif_jax.errors import LayerIFError
from layerif_jax.registry import Registry, module_names

PKG = Path(__file__).resolve().parents[1] / "layerif_jax"


def test_builtin_modules_are_the_registered_names():
    """Every module of the two folders registers the class of its own name (others, e.g.
    a user's, may be registered besides)."""
    from layerif_jax.applications.prune import PRUNERS
    from layerif_jax.influence.estimators import ESTIMATORS
    for folder, registry in ((PKG / "influence" / "estimators", ESTIMATORS),
                             (PKG / "applications" / "prune" / "methods", PRUNERS)):
        names = module_names(folder)
        assert names and set(names) <= set(registry)
        for name in names:
            assert registry[name].__module__.rsplit(".", 1)[1] == name
    assert {"datainf", "identity", "exact", "cg", "lissa", "arnoldi", "cosine"} <= set(ESTIMATORS)
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNERS)


def test_cli_lists_them_without_importing_jax():
    code = ("import sys; from layerif_jax.cli.common import ESTIMATORS, PRUNE_METHODS; "
            "print(ESTIMATORS, PRUNE_METHODS, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == ("('arnoldi', 'cg', 'cosine', 'datainf', 'ekfac', 'exact', 'identity', "
                           "'kfac', 'lissa') ('magnitude', 'sparsegpt', 'wanda') False")


def test_registry_options_and_errors():
    reg = Registry("widget")

    @reg.register
    @dataclasses.dataclass(frozen=True)
    class Knob:
        name = "knob"
        turns: int = 3

    assert reg.get("knob") == Knob(3) and reg.get("knob", turns=5).turns == 5
    assert reg.options("knob") == {"turns"}
    with pytest.raises(LayerIFError, match=r"unknown widget 'dial' \(choose from knob\)"):
        reg.get("dial")
    with pytest.raises(LayerIFError, match=r"'knob' has no option 'size' \(its options: turns\)"):
        reg.get("knob", size=1)


def test_a_users_pruner_plugs_into_prune_model():
    """A pruner written outside the package: zero the first k inputs of every output
    column. Checked against that rule by hand, with the caller's count check."""
    from flax import nnx

    from layerif_jax.applications.prune import PRUNERS, prune_model, register_pruner
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder

    @register_pruner
    @dataclasses.dataclass(frozen=True)
    class FirstInputs:
        name = "first_inputs"
        calibration = None
        default_epsilon = 0.2

        def check(self, nm):
            if nm is not None:
                raise LayerIFError("first_inputs has no N:M form")

        def prune(self, W, sparsity, nm, stats, n_tok):
            k = int(round(sparsity * W.shape[0]))
            Wn = W.at[:k].set(0)
            return Wn, k * W.shape[1], jnp.sum(Wn == 0), k * W.shape[1]

    try:
        cfg = ModelConfig(model_type="llama", vocab_size=31, hidden_size=16,
                          intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                          head_dim=8)
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        dense = {n: np.asarray(lin.kernel[...]) for n, lin in model.layers.linears().items()}
        _, report = prune_model(model, np.full(14, 0.25), "first_inputs")
        for name, lin in model.layers.linears().items():
            got, want = np.asarray(lin.kernel[...]), dense[name].copy()
            want[:, :int(round(0.25 * want.shape[1]))] = 0
            np.testing.assert_array_equal(got, want)
        assert all(v == pytest.approx(0.25, abs=0.02) for v in report.values())
        with pytest.raises(LayerIFError, match="no N:M form"):
            prune_model(model, None, "first_inputs", nm=(2, 4))
    finally:
        PRUNERS.pop("first_inputs", None)
