"""The README's Python API block runs as written (on SmolLM2, in a scratch folder)."""

import os
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_api_block_runs(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_block("## Python API"), "README.md", "exec"), ns)
    L = ns["model"].cfg.num_layers
    assert ns["logits_BTV"].shape[:2] == ns["ids_BT"].shape and ns["logits_BTV"].shape[2] == 49152
    assert ns["res"].layer_scores.shape == (L,) and ns["res"].per_example.shape == (16, L)
    assert int(np.sum(ns["experts"])) == 5 * L
    assert (tmp_path / "runs" / "api_scores" / "scores.json").is_file()
    assert (tmp_path / "runs" / "api_ft" / "adapter" / "adapter_config.json").is_file()
    assert os.getcwd() == str(tmp_path)
