"""The `layerif` command end to end on a tiny model (no torch), every command; and what a
careful user checks: bad input, data loss, resumes of another run, help, notes."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TASK, held_output
from layerif_jax.cli import COMMANDS, main
from layerif_jax.cli.common import Group
from layerif_jax.cli.options import REQUIRED

FT = ["--epochs", "2", "--batch-size", "4", "--warmup", "1", "--lr", "1e-2", "--rank", "4"]


def run(capsys, *argv):
    try:
        code = main(["-q", *map(str, argv)])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(res, *needles):
    code, _, err = res
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors == lines[-1:], err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def ft_dir(tiny_dir, tmp_path_factory):
    """A finished fine-tune of the tiny model on TASK."""
    d = tmp_path_factory.mktemp("ft")
    data = d / "task.json"
    data.write_text(json.dumps(TASK))
    out = d / "ft"
    assert main(["-q", "finetune", "--model", str(tiny_dir), "--data", str(data), "--out",
                 str(out), *FT]) == 0
    return out, data


# -- every command, end to end ------------------------------------------------------------

def test_finetune_scores_allocate(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    assert (ft / "adapter" / "adapter_config.json").is_file()
    state = json.loads((ft / "train_state.json").read_text())
    assert state["status"] == "complete" and state["step"] == 12
    sc = tmp_path / "sc"
    code, out, err = run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data,
                         "--val", data, "--out", sc, "--n-train", 8, "--n-val", 3, "--per-val",
                         "--chunk-size", 2, "--chunks-per-call", 3)
    assert code == 0, err
    assert "need" in err and "all kept" in err          # the memory plan, before the passes
    s = json.loads((sc / "scores.json").read_text())
    assert s["calls"] < s["chunks"], s                  # --chunks-per-call grouped the chunks
    assert set(s["meaning"]) == {"per_example", "layer_scores", "scale"}
    assert s["n_train"] == 8 and s["n_val"] == 3 and len(s["layer_scores"]) == 2
    pe = np.load(sc / "per_example.npy")
    pv, pvl = np.load(sc / "per_val.npy"), np.load(sc / "per_val_layers.npy")
    assert pe.shape == (8, 2) and pv.shape == (8, 3) and pvl.shape == (8, 3, 2)
    np.testing.assert_allclose(pvl.sum(-1), pv, rtol=1e-6)
    np.testing.assert_allclose(pvl.mean(1), pe, rtol=1e-5, atol=1e-6 * np.abs(pe).max())
    assert np.allclose(s["layer_scores"], np.where(pe > 0, pe, 0).sum(0))
    assert s["all_scores_positive"] == bool((pe > 0).all())
    assert (sc / "scores.png").stat().st_size > 1000

    from layerif_jax import allocate as al
    code, out, err = run(capsys, "allocate", "experts", "--scores", sc / "scores.json",
                         "--total", 7, "--out", tmp_path / "e.json")
    assert code == 0, err
    alloc = json.loads((tmp_path / "e.json").read_text())
    assert alloc["experts"] == al.expert_counts(s["layer_scores"], 7, 2.5).tolist()
    assert out.split("\n")[0] == " ".join(map(str, alloc["experts"]))
    code, out, err = run(capsys, "allocate", "sparsity", "--scores", sc / "scores.json",
                         "--config", tiny_dir / "config.json", "--sparsity", 0.5,
                         "--out", tmp_path / "s.json")
    assert code == 0, err
    per = json.loads((tmp_path / "s.json").read_text())["per_matrix"]
    assert list(per)[:2] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]
    assert list(per)[-1] == "layers.1.mlp.down_proj" and len(per) == 14


def _scores_args(tiny_dir, ft_dir):
    ft, data = ft_dir
    return ["scores", "--model", tiny_dir, "--lora", ft, "--train", data, "--val", data,
            "--n-train", 8, "--n-val", 3, "--chunk-size", 4]


def test_scores_across_two_processes_equal_one_process(tiny_dir, ft_dir, tmp_path, capsys):
    """Two `layerif scores` processes on localhost (gloo CPU collectives), one device
    each, joined with --coordinator-address, the parameters split over both (FSDP, each
    process reading its slices of the checkpoint) and the examples too (each process
    tokenises and packs its share): process 0 writes the results, equal to a
    single-process run; process 1 writes nothing."""
    import socket
    common = _scores_args(tiny_dir, ft_dir) + ["--per-val", "--checkpoint-every", "1"]
    code, _, err = run(capsys, *common, "--out", tmp_path / "one")
    assert code == 0, err
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "layerif_jax.cli", "-q", "--coordinator-address",
         f"localhost:{port}", "--process-count", "2", "--process-id", str(i),
         *map(str, common), "--out", str(tmp_path / "two"), "--mesh", "2x1", "--sharding",
         "fsdp"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    assert "layer scores" in outs[0][0] and "layer scores" not in outs[1][0]
    s = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert s["devices"] == 2 and s["processes"] == 2, s
    assert s["mesh"] == "2x1" and s["sharding"] == "fsdp", s
    # each process tokenised, packed and put only its share of the examples
    assert s["examples_read"] == {"train": [4, 4], "val": [2, 1]}, s
    one = np.load(tmp_path / "one" / "per_val_layers.npy")
    np.testing.assert_allclose(np.load(tmp_path / "two" / "per_val_layers.npy"), one,
                               rtol=1e-5, atol=1e-6 * np.abs(one).max())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())   # progress/ dropped, nothing else


def test_no_command_option_is_ambiguous_with_a_global_one():
    """argparse matches every option string against the global options first: a command
    option that is a prefix of two of them (`plan --n` and --no-compile-cache with a
    --num-processes) would be refused as ambiguous."""
    import argparse

    from layerif_jax.cli import build_parser
    top = build_parser()
    glob = [s for a in top._actions for s in a.option_strings if s.startswith("--")]

    def options(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    yield from options(sp)
            else:
                yield from (s for s in a.option_strings if s.startswith("--"))

    bad = sorted({s for s in options(top) if s not in glob
                  and sum(g.startswith(s) for g in glob) > 1})
    assert not bad, bad


def test_multi_process_options_are_checked(tiny_dir, ft_dir, tmp_path, capsys):
    common = _scores_args(tiny_dir, ft_dir) + ["--out", tmp_path / "x"]
    one_line_error(run(capsys, "--process-count", 2, *common), "go together")
    one_line_error(run(capsys, "--coordinator-address", "localhost:1", "--process-count", 2,
                       "--process-id", 2, *common), "--process-id 2 is not below")
    one_line_error(run(capsys, "--coordinator-address", "nohost", "--process-count", 2,
                       "--process-id", 0, *common), "HOST:PORT")
    one_line_error(run(capsys, "--distributed", "--process-count", 2, *common), "not both")
    one_line_error(run(capsys, "--distributed", "plan", "--topology", "v5e:1x1", "--config",
                       "mistral"), "`layerif plan` runs as one process")
    assert not (tmp_path / "x").exists()


def test_scores_refuses_a_mesh_it_cannot_build(tiny_dir, ft_dir, tmp_path, capsys):
    common = _scores_args(tiny_dir, ft_dir)
    out = tmp_path / "sc"
    one_line_error(run(capsys, *common, "--out", out, "--mesh", "2by4"), "DATAxMODEL")
    one_line_error(run(capsys, *common, "--out", out, "--mesh", "1x1"),
                   "needs sharding='fsdp' or 'fsdp_tp'")
    one_line_error(run(capsys, *common, "--out", out, "--mesh", "2x4", "--sharding", "fsdp"),
                   "a 2x4 mesh needs 8 devices, there are 1")
    assert not out.exists()


def test_scores_with_an_iterative_estimator_and_its_options(tiny_dir, ft_dir, tmp_path, capsys):
    """--estimator cg with --estimator-options gives the exact estimator's scores (the
    same damped inverse) and records the options; unknown options and malformed ones are
    refused before the model loads."""
    ft, data = ft_dir
    common = ["scores", "--model", tiny_dir, "--lora", ft, "--train", data, "--val", data,
              "--n-train", 6, "--n-val", 2, "--damping", 0.05]
    code, _, err = run(capsys, *common, "--estimator", "exact", "--out", tmp_path / "ex")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--estimator", "cg", "--estimator-options",
                       "tol=1e-4", "max_iter=300", "--out", tmp_path / "cg")
    assert code == 0, err
    ex = np.load(tmp_path / "ex" / "per_example.npy")
    cg = np.load(tmp_path / "cg" / "per_example.npy")
    assert np.abs(cg - ex).max() <= 1e-3 * np.abs(ex).max()
    s = json.loads((tmp_path / "cg" / "scores.json").read_text())
    assert s["estimator_options"] == {"tol": 1e-4, "max_iter": 300}
    t0 = time.perf_counter()
    one_line_error(run(capsys, *common, "--estimator", "cg", "--estimator-options", "depth=3",
                       "--out", tmp_path / "bad"), "'cg' has no option 'depth'", "max_iter, tol")
    assert time.perf_counter() - t0 < 2.0
    one_line_error(run(capsys, *common, "--estimator-options", "tol", "--out", tmp_path / "b2"),
                   "expected NAME=VALUE")
    t0 = time.perf_counter()
    one_line_error(run(capsys, *common, "--curvature", "gauss_newton", "--out", tmp_path / "b3"),
                   "'datainf' works with the empirical_fisher curvature only")
    assert time.perf_counter() - t0 < 2.0


def test_scores_with_the_true_fisher(tiny_dir, ft_dir, tmp_path, capsys):
    """--curvature true_fisher: K-FAC's factors from the pass at labels drawn from the model
    (the library's; tested against torch there) ran, and the run records its curvature."""
    ft, data = ft_dir
    code, _, err = run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data,
                       "--val", data, "--n-train", 6, "--n-val", 2, "--estimator", "kfac",
                       "--curvature", "true_fisher", "--out", tmp_path / "tf")
    assert code == 0, err
    s = json.loads((tmp_path / "tf" / "scores.json").read_text())
    assert s["curvature"] == "true_fisher" and s["phase_seconds"]["true_fisher"] > 0, s
    assert np.isfinite(np.load(tmp_path / "tf" / "per_example.npy")).all()


def test_alpha_feeds_alphalora_and_alphapruning(tiny_dir, tmp_path, capsys):
    code, out, err = run(capsys, "alpha", "--model", tiny_dir, "--out", tmp_path / "alpha.json")
    assert code == 0, err
    a = json.loads((tmp_path / "alpha.json").read_text())
    assert len(a["alpha"]) == 14 and "layers.1.mlp.up_proj" in a["alpha"]
    from layerif_jax.applications.allocation import pl_alpha_hill
    from layerif_jax.formats import load_model
    m = load_model(tiny_dir)
    want = pl_alpha_hill(np.asarray(m.layers.up_proj.kernel[...][1], np.float64))
    assert a["alpha"]["layers.1.mlp.up_proj"] == pytest.approx(want, rel=1e-12)
    code, out, err = run(capsys, "allocate", "experts", "--method", "alphalora", "--scores",
                         tmp_path / "alpha.json", "--total", 6)
    assert code == 0 and sum(map(int, out.split())) == 6, err
    code, out, err = run(capsys, "allocate", "sparsity", "--allocation", "alphapruning",
                         "--scores", tmp_path / "alpha.json", "--model", tiny_dir,
                         "--sparsity", 0.5)
    assert code == 0 and len(out.split()) == 2, err


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_run_full_then_moe_prune_eval_convert_export(tiny_dir, tmp_path, capsys):
    """`layerif run --full`, then every other command on what it wrote."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "run", "--model", tiny_dir,  # the embedded MRPC records
                       "--n-train", 16, "--n-val", 4, "--max-len", 32, "--lr", 1e-2, "--full",
                       "--n-eval", 6, "--n-calib", 4, "--calib-len", 16, "--ppl-tokens", 512,
                       "--out", out)
    assert code == 0, err
    alloc = json.loads((out / "report" / "allocation.json").read_text())
    assert (out / "report" / "allocation.png").stat().st_size > 1000
    from layerif_jax import allocate as al
    scores = alloc["layer_scores_by_aggregate"]
    assert alloc["experts"]["layerif"] == al.expert_counts(scores["+ve"], 10, 2.5).tolist()
    for method, e in alloc["experts"].items():
        assert sum(e) == 10 and min(e) >= 1, method  # T = 5 per layer, 2 layers
        assert alloc["top_k"][method] == [2 if c > 1 else 1 for c in e]
    counts = np.tile([32 * 32, 32 * 16, 32 * 16, 32 * 32, 32 * 48, 32 * 48, 48 * 32], 2)
    for scheme, s in alloc["sparsity_per_matrix"].items():
        s = np.asarray(list(s.values()))
        assert abs((s * counts).sum() / counts.sum() - 0.5) < 1e-9, scheme
    summary = json.loads((out / "run.json").read_text())
    for method in ("layerif", "uniform"):
        assert abs(summary["full"]["prune"][method]["global_sparsity"] - 0.5) < 0.01
    assert (out / "moe" / "layerif" / "adapter").is_dir()

    # the allocation file `run` writes feeds `allocate` and `moe train`
    code, o, err = run(capsys, "allocate", "experts", "--scores", out / "report" / "allocation.json",
                       "--total", 10)
    assert code == 0 and o.split() == list(map(str, alloc["experts"]["layerif"])), err
    data = tmp_path / "task.json"
    data.write_text(json.dumps(TASK))
    moe = tmp_path / "moe"
    code, o, err = run(capsys, "moe", "train", "--model", tiny_dir, "--data", data,
                       "--experts", out / "report" / "allocation.json", "--allocation", "uniform",
                       "--out", moe, "--epochs", 1, "--batch-size", 4, "--warmup", 1,
                       "--max-len", 32)
    assert code == 0, err
    assert json.loads((moe / "adapter" / "moe_config.json").read_text())["experts"] == \
        alloc["experts"]["uniform"]
    code, o, err = run(capsys, "moe", "eval", "--model", tiny_dir, "--adapter", moe, "--data",
                       data, "--limit", 4, "--mode", "loglik", "--out", tmp_path / "acc.json")
    assert code == 0, err
    res = json.loads((tmp_path / "acc.json").read_text())
    assert res["n"] == 4 and res["correct"] == sum(
        p == g for p, g in zip(res["predictions"], res["gold"]))

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(r["instruction"] + " " + r["output"] for r in TASK * 4))
    code, o, err = run(capsys, "prune", "--model", tiny_dir, "--sparsity", 0.5, "--allocation",
                       "uniform", "--method", "magnitude", "--out", tmp_path / "pruned")
    assert code == 0, err
    rep = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert rep["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    code, o, err = run(capsys, "eval", "ppl", "--model", tmp_path / "pruned", "--data", calib,
                       "--window", 16, "--out", tmp_path / "ppl.json")
    assert code == 0 and json.loads((tmp_path / "ppl.json").read_text())["perplexity"] > 1, err
    code, o, err = run(capsys, "eval", "mc", "--model", tiny_dir, "--task", data, "--limit", 4)
    assert code == 0 and json.loads(o)["tasks"][0]["n"] == 4, err

    code, _, err = run(capsys, "convert", tiny_dir, tmp_path / "ck")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith(".")}
    assert {"config.json", "state", "tokenizer.json"} <= names, names
    from layerif_jax.models.tokenizer import TOKENIZER_FILES
    assert names <= {"config.json", "state", *TOKENIZER_FILES}, names
    code, _, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf", "--lora",
                       out / "finetune")
    assert code == 0, err
    from layerif_jax.formats import load_model
    from layerif_jax.formats.peft import load_adapter
    ref = load_adapter(load_model(tiny_dir), out / "finetune")
    ids = np.array([[1, 5, 9, 13, 2]], np.int32)
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "hf")(ids)),
                               np.asarray(ref(ids)), rtol=1e-5, atol=1e-5)


# -- help --------------------------------------------------------------------------------

def _leaves(cmds=COMMANDS, prefix=()):
    for c in cmds:
        if isinstance(c, Group):
            yield from _leaves(c.commands, prefix + (c.name,))
        else:
            yield prefix + (c.name,), c


def test_every_option_has_help_with_its_default():
    for name, cmd in _leaves():
        for f in dataclasses.fields(cmd.config):
            meta = f.metadata["cli"]
            assert meta["help"], (name, f.name)
            if f.default is not REQUIRED and not (f.default is False and meta["type"] is None):
                from layerif_jax.cli.options import _help
                assert "default:" in _help(f, meta), (name, f.name)
            if f.name == "model":   # --model defaults to the embedded SmolLM2 everywhere
                assert f.default is None and "SmolLM2" in meta["shown"], name


def test_help_is_fast_and_does_not_load_jax():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for name, _ in [((), None), *_leaves()]:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "import sys; from layerif_jax.cli import main;"
                            "code = 0\ntry: main(sys.argv[1:])\nexcept SystemExit as e: code = e.code\n"
                            "assert 'jax' not in sys.modules, 'jax imported'; sys.exit(code)",
                            *name, "--help"], capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        assert r.returncode == 0, (name, r.stderr)
        assert dt < 2.0, (name, dt)
        assert "usage: layerif" in r.stdout


def test_argument_errors_are_one_line_and_fast(tmp_path, task_file, capsys):
    one_line_error(run(capsys, "scores", "--lora", tmp_path, "--train", tmp_path / "no.json",
                       "--val", tmp_path / "no.json", "--out", tmp_path / "o"),
                   "data file not found", "no.json")
    one_line_error(run(capsys, "finetune", "--model", tmp_path / "nope", "--data",
                       tmp_path / "x", "--out", tmp_path / "o"), "model not found")
    one_line_error(run(capsys, "finetune", "--data", tmp_path, "--out", tmp_path / "o"),
                   "is a directory")
    one_line_error(run(capsys, "finetune", "--data", task_file, "--out", tmp_path / "o", "--lr",
                       "-1"), "--lr", "must be > 0")
    assert not (tmp_path / "o").exists()


# -- the list, item by item ------------------------------------------------------------

def test_foreign_files_are_refused_and_never_deleted(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    out = tmp_path / "sc"
    (out / "sub").mkdir(parents=True)
    (out / "important.txt").write_text("mine")
    (out / "sub" / "x").write_text("mine")
    common = ["scores", "--model", tiny_dir, "--lora", ft, "--train", data, "--val", data,
              "--n-train", 4, "--n-val", 2]
    one_line_error(run(capsys, *common, "--out", out), "important.txt, sub", "--overwrite")
    code, _, err = run(capsys, *common, "--out", out, "--overwrite")
    assert code == 0, err
    assert (out / "important.txt").read_text() == "mine" and (out / "sub" / "x").exists()
    assert (out / "scores.json").is_file()
    # `layerif run` into a folder with the user's files, and `--out .`
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    one_line_error(run(capsys, "run", "--model", tiny_dir, "--out", tmp_path / "r"), "keep.txt")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "r")
        t0 = time.perf_counter()
        one_line_error(run(capsys, *common, "--out", "."), "keep.txt")
        assert time.perf_counter() - t0 < 2.0   # refused before any model is loaded
    finally:
        os.chdir(cwd)


def test_resume_with_other_data_or_model_is_refused(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    import shutil
    mine = tmp_path / "ft"
    shutil.copytree(ft, mine)
    args = ["finetune", "--model", tiny_dir, "--out", mine, *FT]
    code, out, err = run(capsys, *args, "--data", data)
    assert code == 0 and "reusing the finished finetune" in err, err
    other = tmp_path / "other.json"
    other.write_text(json.dumps([dict(r, output="maybe.") for r in TASK]))  # same length
    one_line_error(run(capsys, *args, "--data", other), "different run", "training data differs")
    one_line_error(run(capsys, *args, "--data", data, "--dtype", "bfloat16"), "base model differs")
    theta = tmp_path / "theta"                     # the same weights, another config
    shutil.copytree(tiny_dir, theta)
    cfg = json.loads((theta / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    (theta / "config.json").write_text(json.dumps(cfg))
    one_line_error(run(capsys, "finetune", "--model", theta, "--out", mine, *FT, "--data", data),
                   "base model differs")
    one_line_error(run(capsys, *args, "--data", data, "--seed", "3"), "different run")
    one_line_error(run(capsys, *args, "--data", data, "--mask-prompt"), "training data differs")
    # `layerif run --train other` into an existing run folder
    r = tmp_path / "run"
    code, _, err = run(capsys, "run", "--model", tiny_dir, "--n-train", 8, "--n-val", 2,
                       "--max-len", 32, "--out", r)
    assert code == 0, err
    one_line_error(run(capsys, "run", "--model", tiny_dir, "--n-train", 8, "--n-val", 2,
                       "--max-len", 32, "--train", other, "--out", r), "training data differs")


def _rot(ckpts: Path, step: int):
    """Bit rot that still decodes: the arrays of `step` change, its stored checksums don't."""
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(ckpts)
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
    state = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in got["state"].items()}
    first = sorted(state["lora"])[0]
    state["lora"][first] = state["lora"][first] + 1e-3
    mngr.delete(step)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(got["meta"])), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return f"lora/{first}"


def _corrupt(step_dir: Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0x01
            f.write_bytes(bytes(b))


def test_damaged_checkpoints(tiny_dir, tmp_path, capsys):
    data = tmp_path / "task.json"
    data.write_text(json.dumps(TASK))
    out = tmp_path / "ft"
    args = ["finetune", "--model", tiny_dir, "--data", data, "--out", out, *FT,
            "--checkpoint-every", 3, "--keep", 3]
    code, _, err = run(capsys, *args)                 # 12 steps: checkpoints 6, 9, 12 kept
    assert code == 0, err
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [6, 9, 12]
    bad = _rot(out / "checkpoints", 12)
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert f"checkpoint 12 in {out / 'checkpoints'} is damaged (checksum mismatch in {bad})" in err
    assert "resumed finetune from step 9 of 12" in err
    _corrupt(out / "checkpoints" / "12")   # flipped bytes that do not decode
    code, _, err = run(capsys, *args)
    assert code == 0 and "checkpoint 12" in err and "does not match its checksum" in err, err
    for d in (out / "checkpoints").iterdir():         # every checkpoint damaged
        _corrupt(d)
    one_line_error(run(capsys, *args), "no intact checkpoint", "12: file state/")
    out2 = tmp_path / "ft2"                           # truncated files: one line, no asyncio
    args2 = [a if a != out else out2 for a in args]
    assert run(capsys, *args2)[0] == 0
    for d in (out2 / "checkpoints").iterdir():
        for f in (d / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:10])
    r = subprocess.run([sys.executable, "-m", "layerif_jax.cli", "-q", *map(str, args2)],
                       capture_output=True, text=True)
    one_line_error((r.returncode, "", r.stderr), "no intact checkpoint", "has 10 bytes")


def test_null_and_non_string_fields_are_refused(tiny_dir, tmp_path, capsys):
    for bad, needle in (({"output": None}, "record 2 field 'output' is null, expected a string"),
                        ({"output": 3}, "record 2 field 'output' is of type int"),
                        ({"instruction": ["x"]}, "record 2 field 'instruction' is of type list")):
        recs = [dict(r) for r in TASK]
        recs[2].update(bad)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(recs))
        one_line_error(run(capsys, "finetune", "--model", tiny_dir, "--data", p, "--out",
                           tmp_path / "o"), needle)
    recs = [dict(r) for r in TASK]
    del recs[1]["output"]
    p.write_text(json.dumps(recs))
    one_line_error(run(capsys, "finetune", "--model", tiny_dir, "--data", p, "--out",
                       tmp_path / "o"), "record 1 has no field 'output'")
    p.write_text(json.dumps({"data": TASK}, indent=2))
    one_line_error(run(capsys, "finetune", "--model", tiny_dir, "--data", p, "--out",
                       tmp_path / "o"), "expected a list of records")
    assert not (tmp_path / "o").exists()


def test_second_writer_fails_fast_and_unwritable_outputs(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    out = tmp_path / "sc"
    with held_output(out) as pid:
        t0 = time.perf_counter()
        one_line_error(run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data,
                           "--val", data, "--out", out), f"being written by process {pid}")
        assert time.perf_counter() - t0 < 2.0
    (tmp_path / "afile").write_text("x")
    one_line_error(run(capsys, "finetune", "--model", tiny_dir, "--data", data, "--out",
                       tmp_path / "afile"), "exists and is not a directory")
    one_line_error(run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data,
                       "--val", data, "--out", tmp_path / "afile" / "sub"), "not a directory")
    one_line_error(run(capsys, "allocate", "experts", "--layers", 2, "--method", "uniform",
                       "--total", 4, "--out", tmp_path), "is a directory")
    one_line_error(run(capsys, "allocate", "experts", "--layers", 2, "--method", "uniform",
                       "--total", 4, "--out", "/proc/layerif.json"), "cannot write")


def test_nan_adapter_is_refused_everywhere(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    import shutil

    from layerif_jax.formats.safetensors import SafetensorsFile
    bad = tmp_path / "nan"
    shutil.copytree(ft / "adapter", bad)
    f = SafetensorsFile(bad / "adapter_model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    key = sorted(tensors)[3]
    tensors[key][0, 0] = np.nan
    from safetensors.numpy import save_file
    save_file(tensors, str(bad / "adapter_model.safetensors"))   # no checksum: a foreign file
    one_line_error(run(capsys, "export", tiny_dir, tmp_path / "hf", "--lora", bad),
                   key, "NaN or inf")
    one_line_error(run(capsys, "scores", "--model", tiny_dir, "--lora", bad, "--train", data,
                       "--val", data, "--out", tmp_path / "sc"), key, "NaN or inf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "sc").exists()
    # flipped bytes in an adapter this package wrote: its checksum catches them
    flipped = tmp_path / "flipped"
    shutil.copytree(ft / "adapter", flipped)
    p = flipped / "adapter_model.safetensors"
    b = bytearray(p.read_bytes())
    b[-5] ^= 0x10
    p.write_bytes(bytes(b))
    one_line_error(run(capsys, "export", tiny_dir, tmp_path / "hf", "--lora", flipped),
                   "does not match its stored checksum")


def test_code_from_a_checkpoint_never_runs(tiny_dir, tmp_path, capsys):
    import shutil
    evil = tmp_path / "evil"
    shutil.copytree(tiny_dir, evil)
    marker = tmp_path / "pwned"
    (evil / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    conf = json.loads((evil / "tokenizer_config.json").read_text())
    conf["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (evil / "tokenizer_config.json").write_text(json.dumps(conf))
    data = tmp_path / "task.json"
    data.write_text(json.dumps(TASK))
    r = subprocess.run([sys.executable, "-m", "layerif_jax.cli", "-q", "finetune", "--model",
                        str(evil), "--data", str(data), "--out", str(tmp_path / "o")],
                       input="y\ny\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "auto_map" in r.stderr and "never executes" in r.stderr, r.stderr
    one_line_error(run(capsys, "convert", evil, tmp_path / "ck"), "auto_map")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_tok.M"}
    (evil / "config.json").write_text(json.dumps(cfg))
    conf.pop("auto_map")
    (evil / "tokenizer_config.json").write_text(json.dumps(conf))
    one_line_error(run(capsys, "convert", evil, tmp_path / "ck"), "config.json", "auto_map")
    assert not marker.exists() and not (tmp_path / "ck").exists()


def _wait_for(p, needle, timeout=120):
    """Lines of p.stderr until one contains `needle` (progress bars are off: -q)."""
    t0 = time.time()
    buf = ""
    while time.time() - t0 < timeout:
        line = p.stderr.readline()
        if not line:
            break
        buf += line
        if needle in line:
            return buf
    raise AssertionError(f"never saw {needle!r}: {buf}")


@pytest.mark.parametrize("sig,code", [("SIGINT", 130),
                                      pytest.param("SIGTERM", 143, marks=pytest.mark.heavy)])
def test_signals_stop_finetune_with_a_checkpoint(tiny_dir, tmp_path, sig, code):
    import signal
    data = tmp_path / "task.json"
    data.write_text(json.dumps(TASK * 8))
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "layerif_jax.cli", "-q", "finetune", "--model", str(tiny_dir),
           "--data", str(data), "--out", str(out), *FT, "--epochs", "50",
           "--checkpoint-every", "100000"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "checkpoints").is_dir() and time.time() - t0 < 120:
            time.sleep(0.1)                      # the training loop has started
        time.sleep(3)
        t0 = time.perf_counter()
        p.send_signal(getattr(signal, sig))
        err = p.communicate(timeout=60)[1]
        assert time.perf_counter() - t0 < 10
    finally:
        p.kill()
    assert p.returncode == code, err
    assert f"stopped by {sig}" in err and "run the same command again to resume" in err
    steps = [int(d.name) for d in (out / "checkpoints").iterdir()]
    assert steps, err      # saved at the stop (epoch ends are 48 steps apart: at most one)
    p2 = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        buf = _wait_for(p2, "resumed finetune from step")
    finally:
        p2.kill()
        p2.wait()
    assert f"from step {max(steps)} of 2400" in buf


def test_sigint_stops_scores_cleanly(tiny_dir, ft_dir, tmp_path):
    import signal
    ft, data = ft_dir
    big = tmp_path / "big.json"
    big.write_text(json.dumps(TASK * 20))
    out = tmp_path / "sc"
    p = subprocess.Popen([sys.executable, "-m", "layerif_jax.cli", "-q", "scores", "--model",
                          str(tiny_dir), "--lora", str(ft), "--train", str(big), "--val",
                          str(data), "--out", str(out), "--n-train", "480", "--chunk-size", "1",
                          "--chunks-per-call", "1"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(p, "per-example gradients of 480 training examples need")
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
    assert p.returncode == 130, err          # not 139 (a segfault), not 0 (ignored)
    assert "stopped by SIGINT: no scores were written; the gradient passes done so far" in err
    # only the saved progress (which the same command resumes from, tests/test_resume.py)
    assert sorted(q.name for q in out.iterdir()) == [".layerif-manifest.json", "progress"]
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".sc")]


def test_bad_values_give_one_line(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    sc = ["scores", "--model", tiny_dir, "--lora", ft, "--train", data, "--val", data,
          "--out", tmp_path / "sc"]
    one_line_error(run(capsys, *sc, "--memory-budget", "infGB"), "must be finite")
    one_line_error(run(capsys, *sc, "--memory-budget=-1GB"), "must be >= 0")
    one_line_error(run(capsys, *sc, "--memory-budget", "lots"), "cannot read")
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps(["a", "b"]))
    one_line_error(run(capsys, "allocate", "experts", "--scores", scores, "--total", 4),
                   "must be numbers", "'a'")
    one_line_error(run(capsys, "allocate", "experts", "--method", "uniform", "--total", 4),
                   "needs --layers or --scores")
    one_line_error(run(capsys, "allocate", "experts", "--method", "alphalora", "--total", 4),
                   "layerif alpha")
    code, out, err = run(capsys, "allocate", "experts", "--method", "uniform", "--total", 5,
                         "--layers", 2)
    assert code == 0 and out.split() == ["3", "2"], err


def test_messages_point_the_right_way(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    # a scores.json where AlphaLoRA needs PL_Alpha_Hill
    sc = tmp_path / "sc"
    assert run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data, "--val",
               data, "--out", sc, "--n-train", 4, "--n-val", 2)[0] == 0
    one_line_error(run(capsys, "allocate", "experts", "--method", "alphalora", "--scores",
                       sc / "scores.json", "--total", 6), "PL_Alpha_Hill", "layerif alpha")
    # convert / export name the flag
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "mine.txt").write_text("x")
    one_line_error(run(capsys, "convert", tiny_dir, tmp_path / "ck"), "--overwrite", "mine.txt")
    one_line_error(run(capsys, "export", tiny_dir, tmp_path / "ck"), "--overwrite")
    # more layers in config.json than in the weights
    import shutil
    more = tmp_path / "more"
    shutil.copytree(tiny_dir, more)
    cfg = json.loads((more / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (more / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(run(capsys, "convert", more, tmp_path / "c3"),
                         "config.json says 3 layers, the weights hold 2")
    assert "unexpected" not in msg and "9 missing keys" in msg   # layer 2's 7 maps and 2 norms
    # a truncated GGUF
    from conftest import write_gguf
    from layerif_jax.formats import load_model
    from layerif_jax.models.params import model_to_tensors
    gg = write_gguf(tmp_path / "m.gguf", json.loads((tiny_dir / "config.json").read_text()),
                    model_to_tensors(load_model(tiny_dir)), "llama")
    gg.write_bytes(gg.read_bytes()[:-1000])
    one_line_error(run(capsys, "convert", gg, tmp_path / "cg"), "truncated or corrupt GGUF",
                   "expected", "bytes for tensor")


def test_notes_on_surprises(tiny_dir, ft_dir, tmp_path, capsys):
    ft, data = ft_dir
    long = tmp_path / "long.json"
    recs = [dict(r) for r in TASK]
    recs[0]["output"] = "yes. " * 40
    recs[1]["output"] = ""
    long.write_text(json.dumps(recs))
    code, _, err = run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", long,
                       "--val", data, "--out", tmp_path / "sc", "--n-train", 100, "--n-val", 2,
                       "--max-len", 24, "--mask-prompt", "--memory-budget", "100")
    assert code == 0, err
    assert "note: asked for 100 training records but" in err and "holds 24; using 24" in err
    assert "1 of 24 records truncated to --max-len 24" in err
    assert "1 record(s) have an empty output" in err
    assert "every training gradient is recomputed" in err and "raise the memory budget" in err


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_outputs_follow_the_umask(tiny_dir, ft_dir, tmp_path):
    ft, data = ft_dir
    r = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o022); "
                        "from layerif_jax.cli import main; sys.exit(main(sys.argv[1:]))", "-q",
                        "scores", "--model", str(tiny_dir), "--lora", str(ft), "--train",
                        str(data), "--val", str(data), "--out", str(tmp_path / "sc"),
                        "--n-train", "4", "--n-val", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sc").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "sc").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_persistent_compilation_cache(tiny_dir, ft_dir, tmp_path):
    ft, data = ft_dir
    cache = tmp_path / "cache"
    base = [sys.executable, "-m", "layerif_jax.cli", "-q", "--compile-cache", str(cache),
            "scores", "--model", str(tiny_dir), "--lora", str(ft), "--train", str(data),
            "--val", str(data), "--n-train", "6", "--n-val", "2"]
    r = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing cached"
    r = subprocess.run([*base[:4], "--no-compile-cache", *base[6:], "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_sigterm_stops_a_long_evaluation(tiny_dir, tmp_path):
    import signal
    text = tmp_path / "long.txt"
    text.write_text(" ".join(r["instruction"] + " " + r["output"] for r in TASK * 2000))
    p = subprocess.Popen([sys.executable, "-m", "layerif_jax.cli", "-q", "eval", "ppl",
                          "--model", str(tiny_dir), "--data", str(text), "--window", "16",
                          "--batch-size", "1", "--out", str(tmp_path / "ppl.json")],
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)     # model loaded, the windows being scored
        assert p.poll() is None, p.stderr.read()
        t0 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
        assert time.perf_counter() - t0 < 5
    finally:
        p.kill()
    assert p.returncode == 143 and "stopped by SIGTERM: nothing was written" in err, err
    assert not (tmp_path / "ppl.json").exists()
