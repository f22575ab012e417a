"""Influence runs that resume (influence/resume.py): the gradient passes saved as they go,
a run restarted from any saved point gives the scores of an uninterrupted run, and
a folder of another run is refused. The CLI test really kills `layerif scores`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import layerif_jax as lj
from conftest import TASK, random_lora_b
from layerif_jax.errors import LayerIFError
from layerif_jax.influence import layer_scores
from layerif_jax.influence.resume import PROGRESS


def _decoder(seed=0, rank=2):
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder
    from layerif_jax.models.lora import LoraConfig, apply_lora

    cfg = ModelConfig(model_type="llama", vocab_size=41, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(seed)), LoraConfig(rank=rank, alpha=4))
    rng = random_lora_b(model, 0.2, seed)
    ex = lambda k: [lj.Example(rng.integers(0, 41, t).astype(np.int32), np.arange(t) >= 1)
                    for t in rng.integers(3, 12, k)]
    return model, ex(24), ex(5)


def _truncate(folder: Path, keep: int, validation: bool = True) -> None:
    """Forget all but the first `keep` training saves (what a kill before they were listed
    leaves: their folders stay, unlisted)."""
    meta = json.loads((folder / PROGRESS).read_text())
    meta["train"] = meta["train"][:keep]
    if not validation:
        meta["validation"] = None
    (folder / PROGRESS).write_text(json.dumps(meta))


@pytest.mark.parametrize("engine,estimator,budget", [("packed", "ekfac", "8GB"),
                                                     ("vmap", "datainf", 2000)])
def test_resumed_runs_equal_an_uninterrupted_one(tmp_path, engine, estimator, budget):
    model, train, val = _decoder()
    kw = dict(engine=engine, mesh=None, per_val=True, chunk_size=3, chunks_per_call=1,
              estimator=estimator, memory_budget=budget)
    want = layer_scores(model, train, val, **kw)
    folder = tmp_path / "progress"
    full = layer_scores(model, train, val, checkpoint_dir=folder, checkpoint_every=2, **kw)
    meta = json.loads((folder / PROGRESS).read_text())
    calls = meta["fingerprint"]["calls"][0]
    assert calls >= 6 and meta["train"][-1]["end"] == calls and meta["validation"]
    assert full.meta["resumed_calls"] == 0
    np.testing.assert_array_equal(full.per_val_layers, want.per_val_layers)
    if budget != "8GB":   # the memory plan recomputes some calls: they keep no gradients
        assert "0" in meta["fingerprint"]["kept_calls"]
    for keep, validation in ((len(meta["train"]) - 1, True), (1, True), (0, False)):
        _truncate(folder, keep, validation)
        got = layer_scores(model, train, val, checkpoint_dir=folder, checkpoint_every=2, **kw)
        assert got.meta["resumed_calls"] == (meta["train"][keep - 1]["end"] if keep else 0)
        np.testing.assert_allclose(got.per_val_layers, want.per_val_layers, rtol=1e-6,
                                   atol=1e-7 * np.abs(want.per_val_layers).max())
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [PROGRESS, "validation"] + [s["name"] for s in meta["train"]])


def test_another_run_is_refused_and_a_foreign_folder_too(tmp_path):
    model, train, val = _decoder()
    folder = tmp_path / "progress"
    kw = dict(mesh=None, chunk_size=3, checkpoint_dir=folder, checkpoint_every=2)
    layer_scores(model, train, val, **kw)
    with pytest.raises(LayerIFError, match=r"progress of another influence run \(identity\.val"):
        layer_scores(model, train, val[:4], **kw)
    other, _, _ = _decoder(seed=1)
    with pytest.raises(LayerIFError, match=r"another influence run \(identity\.model"):
        layer_scores(other, train, val, **kw)
    with pytest.raises(LayerIFError, match=r"another influence run \(kfac_sums: False in the "
                                           r"checkpoint, True now"):
        layer_scores(model, train, val, estimator="kfac", **kw)
    with pytest.raises(LayerIFError, match=r"another influence run \(kept_calls"):
        layer_scores(model, train, val, memory_budget=1000, **kw)
    # the same gradients serve another estimator
    layer_scores(model, train, val, estimator="identity", **kw)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LayerIFError, match=r"holds files but no progress\.json"):
        layer_scores(model, train, val, **{**kw, "checkpoint_dir": foreign})
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(LayerIFError, match=r"checkpoint every must be an integer >= 1"):
        layer_scores(model, train, val, **{**kw, "checkpoint_every": 0})


def test_a_damaged_save_is_named(tmp_path):
    model, train, val = _decoder()
    folder = tmp_path / "progress"
    kw = dict(mesh=None, chunk_size=3, checkpoint_dir=folder, checkpoint_every=2)
    layer_scores(model, train, val, **kw)
    meta = json.loads((folder / PROGRESS).read_text())
    meta["train"][0]["digests"]["sq/c00000"] = "0" * 64
    (folder / PROGRESS).write_text(json.dumps(meta))
    with pytest.raises(LayerIFError, match=r"damaged \(checksum mismatch in sq/c00000\)"):
        layer_scores(model, train, val, **kw)


# -- the CLI, killed for real ---------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    """A random (non-zero B) LoRA adapter of the tiny model, as a PEFT dir."""
    from layerif_jax.formats import load_model
    from layerif_jax.formats.peft import save_peft_adapter
    from layerif_jax.models.lora import LoraConfig, apply_lora
    model = apply_lora(load_model(tiny_dir), LoraConfig(rank=2, alpha=4))
    random_lora_b(model, 0.2)
    return save_peft_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")


def _scores_argv(tiny_dir, adapter, tmp_path, out):
    from layerif_jax.io import write_json
    records = TASK
    write_json(tmp_path / "train.json", records)
    write_json(tmp_path / "val.json", TASK[:3])
    return ["scores", "--model", str(tiny_dir), "--lora", str(adapter),
            "--train", str(tmp_path / "train.json"), "--val", str(tmp_path / "val.json"),
            "--out", str(out), "--n-train", str(len(records)), "--n-val", "3",
            "--chunk-size", "1", "--chunks-per-call", "1", "--checkpoint-every", "1"]


def _listed(progress: Path) -> tuple[bool, int]:
    try:
        meta = json.loads((progress / PROGRESS).read_text())
    except (OSError, ValueError):
        return False, 0
    return bool(meta.get("validation")), len(meta.get("train", []))


def _main(capsys, *argv):
    from layerif_jax.cli import main
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_cli_killed_at_several_points_resumes_to_the_same_scores(tiny_dir, adapter, tmp_path,
                                                                   capsys):
    import shutil
    code, err = _main(capsys, *_scores_argv(tiny_dir, adapter, tmp_path, tmp_path / "ref"))
    assert code == 0, err
    want = np.load(tmp_path / "ref" / "per_example.npy")

    out = tmp_path / "run"
    argv = _scores_argv(tiny_dir, adapter, tmp_path, out)
    # the killed runs share a compilation cache: only the first compiles
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LAYERIF_COMPILE_CACHE": str(tmp_path / "jit")}
    cmd = [sys.executable, "-m", "layerif_jax.cli"]
    seen = []
    # SIGKILL after the validation pass, then after 2 and after 5 listed training saves
    for validation, saves in ((True, 0), (True, 2), (True, 5)):
        p = subprocess.Popen(cmd + argv, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        t0 = time.time()
        while _listed(out / "progress") < (validation, saves) and p.poll() is None:
            assert time.time() - t0 < 300
            time.sleep(0.005)
        assert p.poll() is None, f"the run ended before the kill: {p.stderr.read()[-500:]}"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        seen.append(_listed(out / "progress"))
        assert not (out / "scores.json").exists()
    assert seen[0][1] < seen[1][1] < seen[2][1] < len(TASK)
    shutil.copytree(out, tmp_path / "copy")

    # another validation set into the unfinished OUT is refused (exit 2, one line) ...
    from layerif_jax.io import write_json
    write_json(tmp_path / "val.json", TASK[1:4])
    code, err = _main(capsys, *argv)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "another influence run (identity.val" in line, err
    assert "--overwrite" in line and "Traceback" not in err
    # ... and with --overwrite starts over
    code, err = _main(capsys, *_scores_argv(tiny_dir, adapter, tmp_path, tmp_path / "copy"),
                      "--overwrite")
    assert code == 0 and "resuming" not in err, err
    assert json.loads((tmp_path / "copy" / "scores.json").read_text())["resumed_calls"] == 0

    # the same command resumes from the last listed save
    write_json(tmp_path / "val.json", TASK[:3])
    code, err = _main(capsys, *argv)
    assert code == 0, err
    assert "resuming the influence run" in err
    got = np.load(out / "per_example.npy")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
    summary = json.loads((out / "scores.json").read_text())
    assert summary["resumed_calls"] >= seen[-1][1]
    assert not (out / "progress").exists()   # dropped once the results are written
