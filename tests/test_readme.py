"""The README's Python API blocks run as written, in order, in one namespace (in a scratch
folder); the last one needs SmolLM2."""

import re
from pathlib import Path

import pytest

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API"):text.index("### Several devices and several hosts")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _run(blocks, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
    return ns


def test_api_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) == 7
    ns = _run(blocks[:6], tmp_path, monkeypatch)
    assert ns["res"].meta["engine"] == "vmap" and ns["res"].per_example.shape == (20, 4)
    assert np.allclose(ns["mine"].per_example, ns["dot"].per_example / 2.0)
    gn = ns["gn"]
    assert gn.meta["curvature"] == "gauss_newton" and gn.meta["estimator_report"]["iterations"] > 0
    assert np.isfinite(gn.per_example).all() and gn.per_example.shape == (50, 3)
    assert ns["sq"].shape == (50, 3, 2) and ns["c"].shape == (50, 1, 3, 2)
    assert (tmp_path / "runs" / "tiny_scores" / "scores.json").is_file()


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_smollm2_block_runs(smollm2_gguf, tmp_path, monkeypatch):
    ns = _run(_blocks(), tmp_path, monkeypatch)
    L = ns["model"].cfg.num_layers
    assert ns["logits_BTV"].shape[:2] == ns["ids_BT"].shape and ns["logits_BTV"].shape[2] == 49152
    assert ns["res"].layer_scores.shape == (L,) and ns["res"].per_example.shape == (16, L)
    assert int(np.sum(ns["experts"])) == 5 * L
    assert (tmp_path / "runs" / "api_scores" / "scores.json").is_file()
    assert (tmp_path / "runs" / "api_ft" / "adapter" / "adapter_config.json").is_file()
