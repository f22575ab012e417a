"""Pruning (METHOD.md section 5): masks, SparseGPT against a float64 NumPy OBS loop,
prune_model on a tiny random decoder, calibration data, OWL / alpha metrics."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerif_jax.errors import LayerIFError
from layerif_jax.models.config import LINEARS, ModelConfig
from layerif_jax.models.decoder import INPUT_OF, Decoder
from layerif_jax.applications.prune.model import _walk_blocks
from conftest import word_tokenizer
from layerif_jax.applications.prune import (
    sparsegpt_counts,
    alpha_per_matrix,
    calibration_ids,
    magnitude_mask,
    outlier_ratios,
    prune_model,
    sparsegpt_prune,
    wanda_mask,
)

CFG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def tiny_model(seed=0):
    return Decoder(CFG, rngs=nnx.Rngs(seed))


def calib(n=6, t=12, seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(n, t)).astype(np.int32)


def tiny_tokenizer(n_words=57):
    return word_tokenizer(n_words)

# ------------------------------------------------------------------ float64 reference
def ref_sparsegpt(W_io, H, sparsity, blocksize, percdamp=0.01, nm=None):
    """SparseGPT's column loop (torch layout, columns = inputs), float64, plain Python."""
    W = np.array(W_io, np.float64).T.copy()
    H = np.array(H, np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    mask = np.zeros_like(W, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        cnt = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        m1 = np.zeros_like(W1, bool)
        if nm is None:
            tmp = W1 ** 2 / np.diag(U1)[None, :] ** 2
            k = int(np.round(np.float32(sparsity) * np.float32(rows * cnt)))
            m1.reshape(-1)[np.argsort(tmp.reshape(-1), kind="stable")[:k]] = True
        for i in range(cnt):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / np.diag(U1)[i:i + nm[1]][None, :] ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :nm[0]]
                m1[np.arange(rows)[:, None], i + idx] = True
            w = W1[:, i]
            q = np.where(m1[:, i], 0.0, w)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = m1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.T, mask.T


def problem(d_in, d_out, n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in)) @ (np.eye(d_in) + 0.5 * rng.normal(size=(d_in, d_in)))
    X *= rng.uniform(0.2, 3.0, size=d_in)  # uneven feature scales
    W = rng.normal(size=(d_in, d_out))
    return X.astype(np.float32), W.astype(np.float32), (2 * X.T @ X / n).astype(np.float32)


# ------------------------------------------------------------------ masks
def test_magnitude_mask_exact_and_lowest():
    W = np.random.default_rng(0).normal(size=(24, 10)).astype(np.float32)
    for s in (0.1, 0.37, 0.5, 0.9):
        m = np.asarray(magnitude_mask(W, s))
        assert m.shape == W.shape and m.dtype == bool
        assert m.sum() == round(s * W.size)
        assert np.abs(W[m]).max() <= np.abs(W[~m]).min()


def test_wanda_mask_per_output():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(20, 7)).astype(np.float32)
    a = rng.uniform(0.1, 5, size=20).astype(np.float32)
    score = np.abs(W) * a[:, None]
    for s in (0.25, 0.5, 0.66):
        m = np.asarray(wanda_mask(W, a, s))
        assert (m.sum(axis=0) == round(s * 20)).all()  # every output column
        for j in range(7):
            assert score[m[:, j], j].max() <= score[~m[:, j], j].min()
    # the activation norm matters: a dominant input is never pruned
    a2 = a.copy()
    a2[3] = 1e6
    assert not np.asarray(wanda_mask(W, a2, 0.9))[3].any()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_structure_all_methods(nm):
    n, m = nm
    X, W, H = problem(32, 12)
    a = np.linalg.norm(X, axis=0)
    masks = [magnitude_mask(W, nm=nm), wanda_mask(W, a, nm=nm),
             sparsegpt_prune(W, H, nm=nm, blocksize=16)[1]]
    for mk in masks:
        g = np.asarray(mk).reshape(32 // m, m, 12)
        assert (g.sum(axis=1) == n).all()
    Wp = np.asarray(sparsegpt_prune(W, H, n / m, nm=nm, blocksize=16)[0])
    assert ((Wp == 0).reshape(32 // m, m, 12).sum(axis=1) >= n).all()


@pytest.mark.parametrize("d_in,d_out,bs,s,nm", [
    (32, 16, 8, 0.5, None),      # the brief's 16 x 32, blocksize 8
    (20, 6, 8, 0.6, None),       # last block narrower than blocksize (padding path)
    (32, 16, 8, None, (2, 4)),
    (16, 5, 8, None, (4, 8)),
    (12, 4, 128, 0.3, None),     # one block wider than the matrix
])
def test_sparsegpt_matches_float64_reference(d_in, d_out, bs, s, nm):
    _, W, H = problem(d_in, d_out, seed=d_in + d_out)
    Wr, Mr = ref_sparsegpt(W, H, s, min(bs, d_in), nm=nm)
    Wp, Mp = sparsegpt_prune(W, H, s, blocksize=bs, nm=nm)
    np.testing.assert_array_equal(np.asarray(Mp), Mr)
    np.testing.assert_allclose(np.asarray(Wp), Wr, rtol=2e-3, atol=2e-4 * np.abs(Wr).max())
    assert (np.asarray(Wp)[Mr] == 0).all()
    if nm is None:
        assert Mr.sum() == sparsegpt_counts(d_in, d_out, s, bs)


def test_sparsegpt_dead_inputs():
    X, W, _ = problem(16, 6)
    X[:, [2, 9]] = 0
    H = (2 * X.T @ X / len(X)).astype(np.float32)
    Wr, Mr = ref_sparsegpt(W, H, 0.5, 8)
    Wp, Mp = sparsegpt_prune(W, H, 0.5, blocksize=8)
    np.testing.assert_array_equal(np.asarray(Mp), Mr)
    np.testing.assert_allclose(np.asarray(Wp), Wr, rtol=2e-3, atol=1e-3)
    assert (np.asarray(Wp)[[2, 9]] == 0).all()


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    X, W, H = problem(48, 24, n=256, seed=3)
    a = np.linalg.norm(X, axis=0)
    for s in (0.5, 0.7):
        err = {}
        err["magnitude"] = np.linalg.norm(X @ W - X @ np.where(magnitude_mask(W, s), 0, W))
        err["wanda"] = np.linalg.norm(X @ W - X @ np.where(wanda_mask(W, a, s), 0, W))
        err["sparsegpt"] = np.linalg.norm(X @ W - X @ np.asarray(sparsegpt_prune(W, H, s, 16)[0]))
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_mask_validation_errors():
    W = np.ones((8, 4), np.float32)
    for s in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(LayerIFError, match="sparsity must be in"):
            magnitude_mask(W, s)
    with pytest.raises(LayerIFError, match="sparsity is required"):
        wanda_mask(W, np.ones(8), None)
    with pytest.raises(LayerIFError, match="1 <= N < M"):
        magnitude_mask(W, nm=(4, 4))
    with pytest.raises(LayerIFError, match="1 <= N < M"):
        wanda_mask(W, np.ones(8), nm=(5, 4))
    with pytest.raises(LayerIFError, match="not divisible by M=4"):
        magnitude_mask(np.ones((10, 4)), nm=(2, 4))
    with pytest.raises(LayerIFError, match="not divisible by M=8"):
        sparsegpt_prune(np.ones((12, 4)), np.eye(12), nm=(4, 8))
    with pytest.raises(LayerIFError, match="fixes the sparsity"):
        magnitude_mask(W, 0.7, nm=(2, 4))
    with pytest.raises(LayerIFError, match="act_norm"):
        wanda_mask(W, np.ones(5), 0.5)
    with pytest.raises(LayerIFError, match="H must be"):
        sparsegpt_prune(W, np.eye(4), 0.5)
    with pytest.raises(LayerIFError, match="2-D"):
        magnitude_mask(np.ones(8), 0.5)


# ------------------------------------------------------------------ prune_model
def _expected(method, s, shape, bs=128):
    d_in, d_out = shape
    if method == "magnitude":
        return round(s * d_in * d_out) / (d_in * d_out)
    if method == "wanda":
        return round(s * d_in) / d_in
    return sparsegpt_counts(d_in, d_out, s, bs) / (d_in * d_out)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_hits_per_matrix_sparsities(method):
    model = tiny_model()
    s = np.random.default_rng(2).uniform(0.1, 0.8, size=14)
    s[3] = 0.0  # a matrix left dense
    _, report = prune_model(model, s, method, calib(), batch_size=4)
    sub = {n: "self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for n in LINEARS}
    assert list(report) == [f"layers.{l}.{sub[n]}.{n}" for l in range(2) for n in LINEARS]
    for k, (name, got) in enumerate(report.items()):
        lin = name.split(".")[-1]
        want = _expected(method, s[k], CFG.linear_shape(lin)) if s[k] else 0.0
        assert got == pytest.approx(want, abs=1e-12), name
        kern = np.asarray(getattr(model.layers, lin).kernel[...][int(name.split(".")[1])])
        assert (kern == 0).mean() == pytest.approx(got)
    assert np.isfinite(np.asarray(model(jnp.asarray(calib(2, 5))))).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_nm(method):
    model = tiny_model()
    options = {"blocksize": 16} if method == "sparsegpt" else {}
    _, report = prune_model(model, None, method, calib(), nm=(2, 4), **options)
    assert all(v == pytest.approx(0.5) for v in report.values())
    for name, lin in model.layers.linears().items():
        k = np.asarray(lin.kernel[...])
        L, d_in, d_out = k.shape
        assert ((k == 0).reshape(L, d_in // 4, 4, d_out).sum(axis=2) >= 2).all()


TORCH_LINEARS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _torch_linear(hf, l, name):
    return getattr(getattr(hf.model.layers[l], TORCH_LINEARS[name]), name)


def _torch_inputs(hf, ids):
    """{(block, linear name): float64 [tokens, d_in]}: the inputs of every linear map of
    the transformers model, recorded by forward pre-hooks (an independent reference for
    what the block walker sees)."""
    import torch

    rec, hooks = {}, []
    for l in range(hf.config.num_hidden_layers):
        for name in LINEARS:
            def hook(mod, args, key=(l, name)):
                rec[key] = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            hooks.append(_torch_linear(hf, l, name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            hf(torch.from_numpy(np.asarray(ids, np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return rec


def _hf_pair(tiny_hf_model, to_layerif, seed=0):
    pytest.importorskip("torch")
    hf = tiny_hf_model("llama", seed=seed)
    return hf, to_layerif(hf)


def _hf_calib(n=6, t=12, seed=1):
    return np.random.default_rng(seed).integers(3, 97, size=(n, t)).astype(np.int32)


def test_wanda_block_by_block_matches_torch(tiny_hf_model, to_layerif):
    """prune_model(wanda) == Wanda done by hand on the transformers model: block l is
    pruned with the inputs its linears see when blocks < l are already pruned (hooks),
    |W| * ||x|| per output row in NumPy float64."""
    import torch

    hf, model = _hf_pair(tiny_hf_model, to_layerif)
    ids = _hf_calib()
    L = hf.config.num_hidden_layers
    pruned, _ = prune_model(model, np.full(7 * L, 0.5), "wanda", ids, batch_size=4)
    dense = _torch_inputs(hf, ids)
    for l in range(L):
        rec = _torch_inputs(hf, ids)
        if l > 0:  # pruning block 0 changed what block 1 sees
            assert not np.allclose(rec[(l, "q_proj")], dense[(l, "q_proj")])
        for name in LINEARS:
            lin = _torch_linear(hf, l, name)
            W = lin.weight.detach().double().numpy()          # [d_out, d_in]
            score = np.abs(W) * np.linalg.norm(rec[(l, name)], axis=0)[None, :]
            k = int(round(0.5 * W.shape[1]))
            drop = np.argsort(score, axis=1, kind="stable")[:, :k]
            Wn = W.copy()
            np.put_along_axis(Wn, drop, 0.0, axis=1)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(Wn))
    for name in LINEARS:
        got = np.asarray(getattr(pruned.layers, name).kernel[...])     # [L, d_in, d_out]
        want = np.stack([_torch_linear(hf, l, name).weight.detach().numpy().T
                         for l in range(L)])
        np.testing.assert_array_equal(got == 0, want == 0, err_msg=name)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_walk_blocks_stats_match_torch_inputs(tiny_hf_model, to_layerif):
    hf, model = _hf_pair(tiny_hf_model, to_layerif)
    ids = _hf_calib()
    rec = _torch_inputs(hf, ids)
    got = {}

    def visit(l, p, stats, n_tok):
        got[l] = stats
        assert n_tok == ids.size
        return p

    _walk_blocks(model, ids, visit, need_h=True, batch_size=4, progress=False, desc="t")
    assert sorted(got) == list(range(hf.config.num_hidden_layers))
    for l, stats in got.items():
        for name in LINEARS:
            st, x = stats[INPUT_OF[name]], rec[(l, name)]
            np.testing.assert_allclose(np.asarray(st["sq"]), (x * x).sum(0), rtol=1e-4)
            np.testing.assert_allclose(np.asarray(st["xtx"]), x.T @ x, rtol=1e-4,
                                       atol=1e-4 * np.abs(x.T @ x).max())


def test_prune_model_errors():
    model = tiny_model()
    with pytest.raises(LayerIFError, match="expected 14 sparsities"):
        prune_model(model, [0.5] * 13, "magnitude")
    with pytest.raises(LayerIFError, match=r"in \[0, 1\)"):
        prune_model(model, [1.0] * 14, "magnitude")
    with pytest.raises(LayerIFError, match="unknown pruning method"):
        prune_model(model, [0.5] * 14, "random")
    with pytest.raises(LayerIFError, match="calibration"):
        prune_model(model, [0.5] * 14, "wanda", None)
    with pytest.raises(LayerIFError, match="outside the vocabulary"):
        prune_model(model, [0.5] * 14, "wanda", np.full((2, 4), 99))
    with pytest.raises(LayerIFError, match="uniform allocation"):
        prune_model(model, [0.4] * 14, "wanda", calib(), nm=(2, 4))
    with pytest.raises(LayerIFError, match="not divisible by M=64"):
        prune_model(model, None, "magnitude", nm=(2, 64))
    with pytest.raises(LayerIFError, match="'magnitude' has no option 'blocksize'"):
        prune_model(model, [0.5] * 14, "magnitude", blocksize=16)
    with pytest.raises(LayerIFError, match="blocksize 6 is not a multiple of M=4"):
        prune_model(model, None, "sparsegpt", calib(), nm=(2, 4), blocksize=6)
    from layerif_jax.models.lora import LoraConfig, apply_lora
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj",)))
    with pytest.raises(LayerIFError, match="LoRA"):
        prune_model(model, [0.5] * 14, "magnitude")


# ------------------------------------------------------------------ OWL, alpha
def test_outlier_ratios_match_torch_inputs(tiny_hf_model, to_layerif):
    hf, model = _hf_pair(tiny_hf_model, to_layerif)
    ids = _hf_calib()
    D = outlier_ratios(model, ids, M=2.0, batch_size=4)
    rec = _torch_inputs(hf, ids)
    want = []
    for l in range(hf.config.num_hidden_layers):  # OWL by hand: pooled |W| * ||x|| of 7 maps
        sc = np.concatenate([
            (np.abs(_torch_linear(hf, l, n).weight.detach().double().numpy())
             * np.linalg.norm(rec[(l, n)], axis=0)[None, :]).ravel() for n in LINEARS])
        want.append((sc > 2.0 * sc.mean()).mean())
    assert min(want) > 0
    np.testing.assert_allclose(D, want, atol=2e-3)  # a score at the threshold may flip


def _planted(shape, alpha, rng):
    """A matrix whose squared singular values are the exact quantiles of a Pareto law
    with density ~ lambda**(-alpha) above 1, hidden behind random orthogonal maps."""
    n = min(shape)
    eigs = (1 - (np.arange(n) + 0.5) / n) ** (-1 / (alpha - 1))
    U = np.linalg.qr(rng.standard_normal((shape[0], n)))[0]
    V = np.linalg.qr(rng.standard_normal((shape[1], n)))[0]
    return U @ np.diag(np.sqrt(eigs)) @ V.T


def test_alpha_per_matrix_recovers_planted_spectra():
    """Every kernel gets its own known power-law exponent; alpha_per_matrix must return
    each in model order (block-major, q k v o gate up down). With 16-64 eigenvalues the
    Hill estimate of exact quantiles is biased up by about (alpha - 1) / n: 2.8% at
    alpha = 2, 4.7% at alpha = 6 on the smallest (16-eigenvalue) maps."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    alphas = np.linspace(2.0, 6.0, 7 * CFG.num_layers)
    rng.shuffle(alphas)
    for j, (name, lin) in enumerate(model.layers.linears().items()):
        k = np.asarray(lin.kernel[...])
        planted = np.stack([_planted(k.shape[1:], alphas[7 * l + j], rng)
                            for l in range(CFG.num_layers)])
        lin.kernel.set_value(jnp.asarray(planted, k.dtype))
    got = alpha_per_matrix(model)
    np.testing.assert_allclose(got, alphas, rtol=0.06)
    assert np.array_equal(np.argsort(got), np.argsort(alphas))


# ------------------------------------------------------------------ calibration data
def test_calibration_ids_text_and_task(tmp_path):
    tok = tiny_tokenizer()
    words = [f"w{i % 57}" for i in range(300)]
    p = tmp_path / "c.txt"
    p.write_text(" ".join(words))
    ids = calibration_ids(tok, p, n_seq=5, seq_len=16, seed=3)
    full = np.asarray(tok(" ".join(words))["input_ids"])
    assert ids.shape == (5, 16) and ids.dtype == np.int32
    for row in ids:  # every row is a window of the tokenised text
        starts = [s for s in range(full.size - 15) if (full[s:s + 16] == row).all()]
        assert starts
    np.testing.assert_array_equal(ids, calibration_ids(tok, p, n_seq=5, seq_len=16, seed=3))
    assert not np.array_equal(ids, calibration_ids(tok, p, n_seq=5, seq_len=16, seed=4))
    with pytest.raises(LayerIFError, match="shorter than one calibration window"):
        calibration_ids(tok, p, n_seq=2, seq_len=301)
    task = tmp_path / "t.json"
    task.write_text(json.dumps([{"instruction": "w1 w2", "output": "w3"},
                                {"instruction": "w4", "input": "w5", "output": "w6 w7"}]))
    ids = calibration_ids(tok, task, n_seq=3, seq_len=7)
    np.testing.assert_array_equal(ids[0], [tok.convert_tokens_to_ids(f"w{i}") for i in range(1, 8)])
    with pytest.raises(LayerIFError, match="not found"):
        calibration_ids(tok, tmp_path / "missing.txt")


# ------------------------------------------------------------------ CLI
def _cli(argv):
    """`layerif ARGV` in this process: the exit code, and the one error line (if any)."""
    import contextlib
    import io

    from layerif_jax.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    if code != 0:
        raise LayerIFError(err.getvalue().strip().splitlines()[-1])
    return code


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from layerif_jax.formats import export_hf
    return export_hf(tiny_model(), tmp_path_factory.mktemp("m") / "tiny",
                     tokenizer=tiny_tokenizer())


def test_cli_prune(hf_dir, tmp_path, capsys):
    from layerif_jax.formats import load_model
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 57}" for i in range(200)))
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps([1.0, 3.0]))
    out = tmp_path / "pruned"
    _cli(["-q", "prune", "--model", str(hf_dir), "--sparsity", "0.5", "--scores", str(scores),
          "--method", "sparsegpt", "--calib", str(text), "--n-calib", "4", "--calib-len", "8",
          "--out", str(out)])
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["allocation"] == "layerif" and rep["epsilon"] == 0.1
    assert rep["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    m = load_model(out)
    k = np.asarray(m.layers.q_proj.kernel[...])
    assert [(k[l] == 0).mean() for l in range(2)] == pytest.approx(
        [rep["achieved"]["layers.0.self_attn.q_proj"], rep["achieved"]["layers.1.self_attn.q_proj"]])
    assert (rep["requested"]["layers.1.self_attn.q_proj"]
            > rep["requested"]["layers.0.self_attn.q_proj"])  # high S
    assert "global sparsity" in capsys.readouterr().out
    _cli(["-q", "prune", "--model", str(hf_dir), "--nm", "2:4", "--method", "wanda",
          "--allocation", "uniform", "--calib", str(text), "--n-calib", "2", "--calib-len", "8",
          "--out", str(out), "--overwrite"])
    assert json.loads((out / "prune_report.json").read_text())["nm"] == "2:4"
    _cli(["-q", "prune", "--model", str(hf_dir), "--sparsity", "0.3", "--allocation", "owl",
          "--method", "magnitude", "--calib", str(text), "--n-calib", "2", "--calib-len", "8",
          "--out", str(out), "--overwrite"])
    assert len(json.loads((out / "prune_report.json").read_text())["metric"]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["--sparsity", "0.5", "--method", "magnitude"], "needs --scores"),
    (["--sparsity", "0.5", "--allocation", "uniform"], "needs --calib"),
    (["--nm", "2:4", "--allocation", "owl"], "use --allocation uniform"),
    (["--nm", "4:2", "--allocation", "uniform"], "1 <= N < M"),
    (["--nm", "2-4", "--allocation", "uniform"], "must look like 2:4"),
    (["--allocation", "uniform", "--method", "magnitude"], "--sparsity is required"),
    (["--sparsity", "1.2", "--allocation", "uniform"], r"in \(0, 1\)"),
])
def test_cli_prune_errors(hf_dir, tmp_path, argv, msg):
    with pytest.raises(LayerIFError, match=msg):
        _cli(["prune", "--model", str(hf_dir), "--out", str(tmp_path / "o"), *argv])
