"""Expert and sparsity allocation (METHOD.md sections 4-5) against hand
computations and the paper's published metric files."""

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import savgol_filter

from layerif_jax.applications.allocation import (
    alphalora_experts,
    expert_counts,
    layer_sparsities,
    mola_experts,
    owl_sparsities,
    pl_alpha_hill,
    sparsity_ratios,
    top_k_per_layer,
    uniform_experts,
)
from layerif_jax.errors import LayerIFError

REF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "layerif-reference"
needs_ref = pytest.mark.skipif(
    not REF.is_dir(), reason=f"golden LayerIF reference data not found at {REF}"
)


def ref(name):
    return REF / name


def block_params(hidden, inter, heads, kv_heads, head_dim, layers):
    """Parameter counts of q,k,v,o,gate,up,down for every block (public HF configs)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    one = [hidden * q, hidden * kv, hidden * kv, q * hidden, hidden * inter, hidden * inter, inter * hidden]
    return np.tile(np.array(one, dtype=np.float64), layers)


MISTRAL = block_params(4096, 14336, 32, 8, 128, 32)
GEMMA = block_params(3072, 24576, 16, 16, 256, 28)


# --------------------------------------------------------------- experts


def test_expert_counts_hand_example():
    # S = [1, 2, 3], beta = 2: w = [1, 4, 9], sum 14; T - L = 7
    # f = [7/14, 28/14, 63/14] = [0.5, 2, 4.5] -> floor + 1 = [1, 3, 5] (sum 9)
    # one expert left: fractional parts [0.5, 0, 0.5] tie -> lower index 0
    assert expert_counts([1.0, 2.0, 3.0], 10, beta=2).tolist() == [2, 3, 5]
    # scale invariance: the same at DataInf magnitudes
    assert expert_counts([1e11, 2e11, 3e11], 10, beta=2).tolist() == [2, 3, 5]


def test_expert_counts_huge_scores_beta3():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.2, 3.0, 32) * 1e11  # S**3 ~ 1e34, beyond float32
    counts = expert_counts(raw, 160, beta=3)
    assert counts.sum() == 160 and counts.min() >= 1
    # hand mapping in plain float64 on rescaled scores
    w = (raw / 1e11) ** 3
    f = w / w.sum() * (160 - 32)
    expected = np.floor(f).astype(int) + 1
    frac = f - np.floor(f)
    expected[np.argsort(-frac, kind="stable")[: 160 - expected.sum()]] += 1
    np.testing.assert_array_equal(counts, expected)


def test_expert_counts_properties_and_zero_scores():
    rng = np.random.default_rng(1)
    for L, T in [(32, 160), (28, 140), (7, 7), (5, 23)]:
        c = expert_counts(rng.uniform(0, 1, L), T)
        assert c.sum() == T and c.min() >= 1 and c.dtype.kind == "i"
    # a zero score is valid: weight 0 -> the 1-expert minimum
    assert expert_counts([0.0, 1.0, 1.0], 9, beta=2).tolist() == [1, 4, 4]
    with pytest.warns(UserWarning):
        assert expert_counts([0.0, 0.0, 0.0], 10).tolist() == [4, 3, 3]


def test_top_k_and_uniform():
    assert top_k_per_layer([1, 2, 5, 1]).tolist() == [1, 2, 2, 1]
    assert uniform_experts(32, 160).tolist() == [5] * 32
    assert uniform_experts(4, 10).tolist() == [3, 3, 2, 2]  # remainder to the first layers


def test_mola_presets():
    assert mola_experts(32, 160, "2-4-6-8").tolist() == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert mola_experts(32, 160, "8-2-2-8").tolist() == [8] * 8 + [2] * 16 + [8] * 8
    assert mola_experts(32, 160, "5-5-5-5").tolist() == [5] * 32
    for L, T in [(32, 100), (30, 150), (28, 140), (6, 6), (9, 40)]:
        for preset in ("2-4-6-8", "8-6-4-2", "5-5-5-5", "8-2-2-8"):
            c = mola_experts(L, T, preset)
            assert c.sum() == T and c.min() >= 1
        groups = [g.mean() for g in np.array_split(mola_experts(L, T, "2-4-6-8"), 4)]
        assert groups == sorted(groups)
        groups = [g.mean() for g in np.array_split(mola_experts(L, T, "8-6-4-2"), 4)]
        assert groups == sorted(groups, reverse=True)
    # 30 layers -> groups of 8, 8, 7, 7 (np.array_split); T = 8*2 + 8*4 + 7*6 + 7*8 = 146
    # makes every share exactly its preset number
    c = mola_experts(30, 146, "2-4-6-8")
    assert c.tolist() == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7


def test_alphalora_uses_block_mean():
    alpha = np.repeat([2.0, 4.0, 3.0], 7) + np.tile(np.linspace(-0.3, 0.3, 7), 3)
    assert alphalora_experts(alpha, 15, beta=2.5).tolist() == expert_counts([2.0, 4.0, 3.0], 15).tolist()
    assert alphalora_experts([2.0, 4.0, 3.0], 15, per_block=1).tolist() == expert_counts([2, 4, 3], 15).tolist()


def reference_expert_counts(scores, total, beta):
    """METHOD.md section 4 written out in plain float64 Python, one layer at a time."""
    L = len(scores)
    w = [float(x) ** beta for x in scores]
    f = [wl / sum(w) * (total - L) for wl in w]
    counts = [int(np.floor(fl)) + 1 for fl in f]
    frac = [fl - np.floor(fl) for fl in f]
    for i in sorted(range(L), key=lambda i: (-frac[i], i))[:total - sum(counts)]:
        counts[i] += 1
    return counts


@needs_ref
@pytest.mark.parametrize("total, beta", [(160, 2.5), (96, 3.0), (200, 1.0)])
def test_alphalora_golden_mistral(total, beta):
    alpha = np.load(ref("mistral-7b/alpha_peak.npy"))
    block_mean = [float(np.mean(alpha[7 * l:7 * l + 7])) for l in range(32)]
    want = reference_expert_counts(block_mean, total, beta)
    assert alphalora_experts(alpha, total, beta=beta).tolist() == want
    # the allocation is not flat: the published alphas spread the experts
    assert max(want) > min(want) + 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: expert_counts([1, 2, 3], 2), "T=2"),
        (lambda: expert_counts([1, 2, 3], 10, beta=0), "beta"),
        (lambda: expert_counts([1, -2, 3], 10), "layer 1"),
        (lambda: expert_counts([1, np.nan, 3], 10), "index 1"),
        (lambda: expert_counts([1, np.inf, 3], 10), "index 1"),
        (lambda: mola_experts(32, 160, "1-2-3-4"), "preset"),
        (lambda: uniform_experts(32, 31), "T=31"),
        (lambda: alphalora_experts(np.ones(22), 40), "PL_Alpha_Hill values, 7 per block"),
    ],
)
def test_expert_errors(call, match):
    with pytest.raises(LayerIFError, match=match):
        call()


# --------------------------------------------------------------- sparsity


def test_sparsity_hand_example():
    # L = 3, one matrix per block, no smoothing, eps = 0.2, target 0.5
    # a = [0, 1, 0.5] -> r = [0.8, 1.2, 1.0]; d = [2, 1, 1]: sum d = 4, sum d r = 3.8
    s = sparsity_ratios([1.0, 3.0, 2.0], [2, 1, 1], 0.5, 0.2, smooth=False, per_block=1)
    eta = 0.5 * 4 / 3.8
    np.testing.assert_allclose(s, [0.8 * eta, 1.2 * eta, 1.0 * eta], rtol=1e-14)
    # |S|: negative scores are folded
    np.testing.assert_allclose(sparsity_ratios([-1.0, 3.0, -2.0], [2, 1, 1], 0.5, 0.2, smooth=False, per_block=1), s)
    # reversed: the highest S gets the lowest sparsity, r = [1.2, 0.8, 1.0]
    rev = layer_sparsities("reversed", layer_scores=[1.0, 3.0, 2.0], param_counts=[2, 1, 1],
                           target=0.5, epsilon=0.2, smooth=False, per_block=1)
    eta = 0.5 * 4 / (2 * 1.2 + 0.8 + 1.0)
    np.testing.assert_allclose(rev, [1.2 * eta, 0.8 * eta, 1.0 * eta], rtol=1e-14)


def test_clip_and_constant_scores():
    s = sparsity_ratios([0.0, 1.0], [1, 1], 0.9, 0.5, smooth=False, per_block=1)  # 0.45, 1.35
    np.testing.assert_allclose(s, [0.45, 0.99])
    with pytest.warns(UserWarning, match="constant"):
        s = sparsity_ratios(np.full(32, 0.7), MISTRAL, 0.5, 0.3)
    assert np.array_equal(s, np.full(224, 0.5))


def test_short_model_smoothing_rule():
    # L = 6 uses window 5; L = 4 cannot smooth (window 3 <= order 3) and is left as is
    d = np.ones(6)
    s = np.array([0.0, 1.0, 0.2, 0.9, 0.4, 0.6])
    a = savgol_filter(s, 5, 3, mode="interp")
    a = (a - a.min()) / (a.max() - a.min())
    r = 0.9 + 0.2 * a
    np.testing.assert_allclose(sparsity_ratios(s, d, 0.5, 0.1, per_block=1), 0.5 * r / r.mean())
    np.testing.assert_allclose(sparsity_ratios(s[:4], d[:4], 0.5, 0.1, per_block=1),
                               sparsity_ratios(s[:4], d[:4], 0.5, 0.1, smooth=False, per_block=1))


def test_schemes_uniform_alphapruning():
    d = np.array([1.0, 2.0, 1.0])
    assert layer_sparsities("uniform", param_counts=d, target=0.6, epsilon=0.1, per_block=1).tolist() == [0.6] * 3
    # AlphaPruning: higher alpha -> more sparsity, never smoothed
    ap = layer_sparsities("alphapruning", alpha=[2.0, 4.0, 3.0], param_counts=d, target=0.5,
                          epsilon=0.1, per_block=1)
    eta = 0.5 * 4 / (0.9 + 2 * 1.1 + 1.0)
    np.testing.assert_allclose(ap, [0.9 * eta, 1.1 * eta, 1.0 * eta], rtol=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=1.0), "target"),
        (dict(target=0.0), "target"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(layer_scores=np.ones(31)), "31 entries.*32"),
        (dict(param_counts=np.ones(10)), "per_block=7"),
        (dict(layer_scores=[1.0] * 31 + [np.nan]), "index 31"),
    ],
)
def test_sparsity_errors(kwargs, match):
    args = dict(layer_scores=np.linspace(0, 1, 32), param_counts=MISTRAL, target=0.5, epsilon=0.3) | kwargs
    with pytest.raises(LayerIFError, match=match):
        sparsity_ratios(**args)


def test_dispatcher_errors():
    with pytest.raises(LayerIFError, match="scheme"):
        layer_sparsities("magic", param_counts=MISTRAL, target=0.5, epsilon=0.1)
    with pytest.raises(LayerIFError, match="needs layer_scores"):
        layer_sparsities("layerif", param_counts=MISTRAL, target=0.5, epsilon=0.1)
    with pytest.raises(LayerIFError, match="outlier_ratios"):
        layer_sparsities("owl", outlier_ratios=np.ones(5), param_counts=MISTRAL, target=0.5, epsilon=0.1)


@needs_ref
@pytest.mark.parametrize("eps", [0.3, 0.1])
def test_golden_mistral_layerif(eps):
    scores = np.load(ref("mistral-7b/IF-300-96.npy"))  # per matrix, constant within a block
    s = sparsity_ratios(scores, MISTRAL, 0.5, eps, smooth=False, clip=1.0)
    assert s.shape == (224,)
    np.testing.assert_allclose((MISTRAL * s).sum() / MISTRAL.sum(), 0.5, rtol=1e-12)
    block = s.reshape(32, 7)
    assert np.ptp(block, axis=1).max() == 0
    a = scores.reshape(32, 7).mean(1)
    eta = 0.5 * MISTRAL.sum() / (MISTRAL * np.repeat(a * 2 * eps + 1 - eps, 7)).sum()
    np.testing.assert_allclose(block[:, 0], eta * (a * 2 * eps + 1 - eps), rtol=1e-12)
    # ordering follows the scores; range is [eta(1-eps), eta(1+eps)] (a spans [0, 1])
    assert np.array_equal(np.argsort(block[:, 0], kind="stable"), np.argsort(a, kind="stable"))
    np.testing.assert_allclose([s.min(), s.max()], [eta * (1 - eps), eta * (1 + eps)], rtol=1e-12)
    # clip at 0.99 bites at a 98% target and touches nothing else
    free = sparsity_ratios(scores, MISTRAL, 0.98, eps, clip=1.0)
    assert free.max() > 0.99
    np.testing.assert_array_equal(sparsity_ratios(scores, MISTRAL, 0.98, eps), np.minimum(free, 0.99))


@needs_ref
def test_golden_smoothed_file_is_savgol_of_block_means():
    raw = np.load(ref("mistral-7b/IF-300-96.npy")).reshape(32, 7).mean(1)
    smoothed = np.load(ref("mistral-7b/IF-300-96-smoothed.npy")).reshape(32, 7)
    # The published smoothed file is savgol(window 7, order 3, interp) of the 32
    # BLOCK values, rounded to 4 decimals (not savgol over the 224-vector, and
    # not re-normalised to [0, 1]).
    assert np.ptp(smoothed, axis=1).max() == 0
    per_block = savgol_filter(raw, 7, 3, mode="interp")
    assert np.abs(per_block - smoothed[:, 0]).max() <= 5e-5 + 1e-12
    per_matrix = savgol_filter(np.repeat(raw, 7), 7, 3, mode="interp").reshape(32, 7)
    assert np.abs(per_matrix - smoothed).max() > 0.05
    # so smoothing inside sparsity_ratios reproduces the paper's sparsities from the file
    ours = sparsity_ratios(np.repeat(raw, 7), MISTRAL, 0.5, 0.3, smooth=True)
    paper = sparsity_ratios(smoothed.ravel(), MISTRAL, 0.5, 0.3, smooth=False)
    np.testing.assert_allclose(ours, paper, atol=1e-4)


def reference_sparsities(block_values, d, target, eps):
    """METHOD.md section 5 steps 1 and 3-6 (no smoothing) in plain float64 Python, one
    block value per block, broadcast to its 7 matrices with parameter counts d."""
    a = [abs(float(v)) for v in block_values]
    lo, hi = min(a), max(a)
    a = [(x - lo) / (hi - lo) for x in a]
    r = [x * 2 * eps + (1 - eps) for x in a for _ in range(7)]
    eta = target * sum(d) / sum(dk * rk for dk, rk in zip(d, r))
    return [min(eta * rk, 0.99) for rk in r]


@needs_ref
@pytest.mark.parametrize("target, eps", [(0.5, 0.1), (0.7, 0.3)])
def test_golden_gemma_layerif(target, eps):
    smoothed = np.load(ref("gemma-7b/IF-300-96-smoothed.npy"))  # constant within a block
    s = sparsity_ratios(smoothed, GEMMA, target, eps, smooth=False)
    want = reference_sparsities(smoothed.reshape(28, 7)[:, 0], GEMMA.tolist(), target, eps)
    np.testing.assert_allclose(s, want, rtol=1e-12)
    assert np.ptp(want) > 0.1 * target  # the published scores spread the sparsity


@needs_ref
def test_golden_alphapruning_mistral():
    alpha = np.load(ref("mistral-7b/alpha_peak.npy"))
    s = layer_sparsities("alphapruning", alpha=alpha, param_counts=MISTRAL, target=0.5, epsilon=0.1)
    block_mean = [float(np.mean(alpha[7 * l:7 * l + 7])) for l in range(32)]
    np.testing.assert_allclose(s, reference_sparsities(block_mean, MISTRAL.tolist(), 0.5, 0.1),
                               rtol=1e-12)


# --------------------------------------------------------------- OWL


def test_owl_hand_example():
    # D = [1, 3, 2] -> [0, 1, 0.5] * 0.16 = [0, .16, .08], mean .08 -> density .5 + [-.08, .08, 0]
    s = owl_sparsities([1.0, 3.0, 2.0], 0.5, lam=0.08, per_block=2)
    np.testing.assert_allclose(s, [0.58, 0.58, 0.42, 0.42, 0.5, 0.5], atol=1e-15)


@needs_ref
@pytest.mark.parametrize("name, L", [("mistral-7b/OWL_prune_ratio_mistral_0.5.txt", 32),
                                     ("gemma-7b/OWL_prune_ratio_gemma_0.5.txt", 28)])
def test_golden_owl(name, L):
    golden = np.array(ast.literal_eval(ref(name).read_text()), dtype=np.float64)
    blocks = golden.reshape(L, 7)
    assert np.ptp(blocks, axis=1).max() == 0
    b = blocks[:, 0]
    # the published file: plain mean over blocks = target, range 2 * lambda = 0.16
    np.testing.assert_allclose([b.mean(), np.ptp(b)], [0.5, 0.16], atol=1e-8)
    # any outlier vector affinely increasing in the file's density reproduces it
    # (more outliers -> denser -> lower sparsity)
    outliers = 0.02 + 0.3 * (1 - b)
    ours = owl_sparsities(outliers, 0.5, lam=0.08)
    np.testing.assert_allclose(ours, golden, atol=1e-7)
    via = layer_sparsities("owl", outlier_ratios=outliers, param_counts=np.ones(7 * L),
                           target=0.5, epsilon=0.1)
    np.testing.assert_allclose(via, ours)


# --------------------------------------------------------------- PL_Alpha_Hill


def _householder(n, rng):
    """A random orthogonal reflection (cheaper than a QR of a gaussian matrix)."""
    v = rng.standard_normal(n)
    return np.eye(n) - 2 * np.outer(v, v) / (v @ v)


def test_pl_alpha_hill_formula_mid():
    # eigenvalues [1, 2, 4, 8], xmin = lambda_(N//2) = 4, tail {4, 8}, n = 2:
    # alpha = 1 + 2 / (ln(4/4) + ln(8/4)) = 1 + 2 / ln 2
    w = np.diag(np.sqrt([8.0, 1.0, 4.0, 2.0]))
    assert pl_alpha_hill(w, xmin="mid") == pytest.approx(1 + 2 / np.log(2), rel=1e-12)


@pytest.mark.parametrize("alpha_true, seed", [(2.5, 0), (3.0, 1), (4.0, 2)])
def test_pl_alpha_hill_recovers_pareto_tail(alpha_true, seed):
    rng = np.random.default_rng(seed)
    # a bulk below 1 and a Pareto tail above 1 with density ~ lambda**(-alpha_true)
    # (numpy's pareto(a) + 1 has exponent a + 1), hidden behind orthogonal maps.
    # The MLE's sampling error is about (alpha - 1)/sqrt(400), 4-8%; over 20 seeds
    # the worst case was 13%.
    eigs = np.concatenate([rng.uniform(0.05, 1.0, 100), rng.pareto(alpha_true - 1, 400) + 1.0])
    n = eigs.size
    w = _householder(n, rng) @ np.diag(np.sqrt(eigs)) @ _householder(n, rng)
    assert pl_alpha_hill(w) == pytest.approx(alpha_true, rel=0.15)


def test_pl_alpha_hill_errors():
    with pytest.raises(LayerIFError, match="2-D"):
        pl_alpha_hill(np.ones(5))
    with pytest.raises(LayerIFError, match="xmin"):
        pl_alpha_hill(np.eye(3), xmin="median")
    with pytest.raises(LayerIFError, match="all equal"):
        pl_alpha_hill(np.eye(4))
