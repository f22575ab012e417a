"""`layerif bench` and `run_bench`: the built-in benchmarks end to end on small sizes
(a tiny model for the LM ones), the report, resuming and refusing another run's
sections. The metrics against SciPy / hand-computed values."""

import json

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from conftest import TASK, tiny_lora_decoder
from test_cli import one_line_error, run

TASK_FILES = {"glue_cola": "", "glue_mrpc": "", "glue_rte": "", "qa_openbook": "_all"}


@pytest.fixture()
def tasks_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    for k, (name, tail) in enumerate(TASK_FILES.items()):
        recs = [{**r, "instruction": f"[{name}] {r['instruction']}"} for r in TASK]
        for split in ("train", "validation"):
            (d / f"{name}_{split}{tail}.json").write_text(json.dumps(recs))
    return d


def test_metrics_against_scipy_and_by_hand():
    from layerif_jax.bench import auc, found_curve, recall_at_k
    rng = np.random.default_rng(0)
    s, pos = rng.normal(size=50), rng.random(50) < 0.3
    u = mannwhitneyu(s[pos], s[~pos]).statistic
    assert auc(s, pos) == pytest.approx(u / (pos.sum() * (~pos).sum()))
    score = np.array([5.0, 4, 3, 2, 1])
    truth = np.array([True, False, True, False, False])
    assert found_curve(score, truth, [0.2, 0.6, 1.0]) == [0.5, 1.0, 1.0]
    assert recall_at_k(score, truth, 2) == 0.5


def test_digits_benchmarks_from_python(tmp_path):
    pytest.importorskip("sklearn")
    from layerif_jax.bench import run_bench, settings_for
    cfgs = "exact:gauss_newton:block,identity:empirical_fisher:block"
    st = settings_for(["lds-digits", "mislabel-digits"], quick=True, overrides={
        "lds-digits": dict(n=120, m=10, subsets=6, configs=cfgs),
        "mislabel-digits": dict(n=150, m=20, configs=cfgs)})
    got = run_bench(tmp_path / "b", st, log=lambda *_: None)
    lds = {r["config"]: r["lds"] for r in got["lds-digits"]["result"]["rows"]}
    assert set(lds) == set(cfgs.split(","))
    # the influence function of the regularised objective predicts the retrained losses
    assert lds["exact:gauss_newton:block"] > 0.8 > lds["identity:empirical_fisher:block"] - 0.2
    mis = got["mislabel-digits"]["result"]["rows"][0]
    assert mis["self_influence_auc"] > 0.8 and len(mis["validation_found"]) == 5
    out = tmp_path / "b"
    assert {"report.json", "report.md", "lds_digits.png", "mislabel_digits.png",
            "sections"} <= {p.name for p in out.iterdir()}
    assert "| exact | gauss_newton | block |" in (out / "report.md").read_text()


@pytest.mark.heavy   # leg 1 only (see .ci/run)
def test_bench_cli_end_to_end_resumes_and_refuses(tiny_dir, tasks_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--model", tiny_dir, "--tasks-dir", tasks_dir, "--out", out,
            "--estimators", "exact,datainf,identity,ekfac", "--n", "8", "--m", "3",
            "--per-task", "4"]
    code, stdout, err = run(capsys, *args, "--suites", "estimators-lm")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    rows = {r["estimator"]: r for r in rep["estimators-lm"]["result"]["rows"]}
    assert set(rows) == {"exact", "datainf", "identity", "ekfac"}
    assert rows["datainf"]["layer_spearman_vs_datainf"] == pytest.approx(1.0)
    # every estimator's IHVP against exact's (the exact one is the reference)
    assert "ihvp_error_vs_exact" not in rows["exact"]
    for name in ("datainf", "identity", "ekfac"):
        err = rows[name]["ihvp_error_vs_exact"]
        assert 0 < err["median"] <= err["max"], (name, err)
    assert "IHVP error vs exact" in (out / "report.md").read_text()
    assert "own peak MiB" in (out / "report.md").read_text()
    # each estimator's own peak memory (on CPU the resident set's growth; memory.Peak is
    # held to allocations of known size in test_memory.py)
    assert all(r["peak_source"] == "rss" and r["peak_mib_own"] >= 0 for r in rows.values())
    assert rep["estimators-lm"]["settings"]["adapter"].startswith("random LoRA")
    first = (out / "sections" / "estimators-lm.json").stat().st_mtime_ns
    # a second benchmark joins the folder; the finished one is kept, not rerun
    code, _, err = run(capsys, *args, "--suites", "estimators-lm,class-detection")
    assert code == 0, err
    assert (out / "sections" / "estimators-lm.json").stat().st_mtime_ns == first
    rep = json.loads((out / "report.json").read_text())
    cd = {r["estimator"]: r for r in rep["class-detection"]["result"]["rows"]}
    assert rep["class-detection"]["result"]["n_train"] == 16 and 0 <= cd["ekfac"]["auc"] <= 1
    assert {"class_detection.png", "cost_vs_agreement.png"} <= {p.name for p in out.iterdir()}
    # other settings on a finished section: refused, naming the difference
    one_line_error(run(capsys, *args[:-6], "--estimators", "exact,datainf,identity,ekfac",
                       "--n", "9", "--m", "3", "--suites", "estimators-lm"), "other settings",
                   "n: 8 there, 9 now")
    one_line_error(run(capsys, "bench", "--out", tmp_path / "x", "--suites", "lds,cg"),
                   "unknown benchmark")
    one_line_error(run(capsys, "bench", "--out", tmp_path / "x", "--suites", "lds-digits",
                       "--configs", "exact:hessian:tensor"), "unknown configuration")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    one_line_error(run(capsys, *args[:-2], "--out", tmp_path / "mine"), "did not write")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


def test_the_cli_offers_the_runners_benchmarks():
    """The CLI keeps its own copy of the names (parsing must not import jax): they agree."""
    from layerif_jax.bench import runner
    from layerif_jax.cli import bench as cli_bench
    assert cli_bench.SUITES == runner.SUITES and cli_bench.LM_SUITES == runner.LM_SUITES


def test_lds_metric_by_hand():
    from layerif_jax.bench import lds
    tau = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, -1.0]])
    subsets = [np.array([0, 1]), np.array([1, 2]), np.array([0, 2])]
    # predicted losses -(sum of the subset's influences): column 0 -3, -6, -5; column 1 -1, 0, 1
    assert lds(tau, subsets, np.array([[3.0, 5], [1, 6], [2, 7]])) == pytest.approx(1.0)
    assert lds(tau, subsets, np.array([[1.0, 7], [3, 6], [2, 5]])) == pytest.approx(-1.0)
    # column 0 ranks (3, 1, 2) against measured (1, 2, 3): Spearman -0.5; column 1: +1
    assert lds(tau, subsets, np.array([[1.0, 0], [2, 1], [3, 2]])) == pytest.approx(0.25)


class _Stop(Exception):
    """Raised from the log callback: a stop between two retrains."""


def _lm_examples(n, m, seed=0):
    from layerif_jax.data import Example
    rng = np.random.default_rng(seed)
    make = lambda k: [Example(rng.integers(3, 64, t).astype(np.int32),  # noqa: E731
                              np.arange(t) >= 1) for t in rng.integers(6, 14, k)]
    return make(n), make(m)


def test_lm_lds_resumes_its_retrains_and_refuses_another_runs(tmp_path):
    """lds_lm: a run stopped after two of four retrains resumes with the other two only
    and ends exactly where an uninterrupted run does; the model gets its initial adapter
    back (after the stop too); a record of other settings is refused."""
    import jax
    from flax import nnx

    from layerif_jax.bench import lds_lm
    from layerif_jax.errors import LayerIFError
    from layerif_jax.io import read_json
    model, _ = tiny_lora_decoder()
    init = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]
    same_adapter = lambda: all(np.array_equal(a, np.asarray(b)) for a, b in zip(  # noqa: E731
        init, jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))
    train, val = _lm_examples(12, 3)
    state = tmp_path / "retrains.json"
    kw = dict(subsets=4, estimators=("exact", "identity"), epochs=2, lr=1e-2, batch_size=4)

    def stop_at_second(msg):
        if "retrain 2/4" in msg:
            raise _Stop

    with pytest.raises(_Stop):
        lds_lm(model, train, val, state=state, log=stop_at_second, **kw)
    assert same_adapter()
    assert sorted(read_json(state)["losses"]) == ["0", "1"]
    logs = []
    resumed = lds_lm(model, train, val, state=state, log=logs.append, **kw)
    assert [m for m in logs if "retrain" in m][0].startswith("lds-lm      retrain 3/4")
    secs = read_json(state)["seconds"]   # the stopped run's two retrains count too
    assert len(secs) == 4 and resumed["retrain_seconds"] == pytest.approx(
        sum(secs.values()), abs=0.1)
    assert same_adapter()
    fresh = lds_lm(model, train, val, log=lambda *_: None, **kw)
    assert np.array_equal(resumed["val_losses"], fresh["val_losses"])
    assert [r["lds"] for r in resumed["rows"]] == [r["lds"] for r in fresh["rows"]]
    assert all(-1 <= r["lds"] <= 1 for r in fresh["rows"])
    # training moved the losses: each half's fine-tune differs from the others'
    assert len({tuple(r) for r in np.round(fresh["val_losses"], 6)}) == 4
    with pytest.raises(LayerIFError, match="another LDS run"):
        lds_lm(model, train, val, state=state, **{**kw, "lr": 2e-2})


def test_bench_cli_runs_the_lm_lds(tiny_dir, tasks_dir, tmp_path, capsys):
    out = tmp_path / "lds"
    code, _, err = run(capsys, "bench", "--model", tiny_dir, "--tasks-dir", tasks_dir,
                       "--out", out, "--suites", "lds-lm", "--quick", "--subsets", "3",
                       "--estimators", "exact,identity")
    assert code == 0, err
    sec = json.loads((out / "report.json").read_text())["lds-lm"]
    assert sec["settings"]["subsets"] == 3 and sec["settings"]["n"] == 16
    res = sec["result"]
    assert {r["estimator"] for r in res["rows"]} == {"exact", "identity"}
    assert np.asarray(res["val_losses"]).shape == (3, 4)
    assert all(-1 <= r["lds"] <= 1 for r in res["rows"])
    assert not (out / "sections" / "lds-lm.partial.json").exists()   # the section is whole
    assert (out / "lds_lm.png").is_file() and "## lds-lm" in (out / "report.md").read_text()
