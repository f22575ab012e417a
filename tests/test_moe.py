"""LoRA-MoE: formula vs NumPy, init = base, 1 expert = LoRA, training, resume, adapter I/O."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerif_jax.data import Example
from layerif_jax.errors import LayerIFError
from layerif_jax.models.config import LINEARS, ModelConfig
from layerif_jax.models.decoder import Decoder
from layerif_jax.models.lora import LoraConfig, apply_lora
from layerif_jax.applications.moe import (TRAINABLE, MoELoraModel, RouterParam, load_moe_adapter,
                                          moe_delta, resolve_top_k, save_moe_adapter, train_moe)
from layerif_jax.evaluation import accuracy, extract_answer, generate_answer
from layerif_jax.training import TrainConfig

CFG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
EXPERTS = [1, 3, 2]
RANK, ALPHA = 4, 8.0
TASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "layerif-tasks"


_BASE = {}


def make_base():
    """A random Decoder with weights scaled up so logits are not all ~0 (built once, cloned)."""
    if "m" not in _BASE:
        base = Decoder(CFG, rngs=nnx.Rngs(0))
        base.embed_tokens[...] = base.embed_tokens[...] * 50.0
        base.lm_head[...] = base.lm_head[...] * 25.0
        for lin in base.layers.linears().values():
            lin.kernel[...] = lin.kernel[...] * 8.0
        _BASE["m"] = base
    return nnx.clone(_BASE["m"])


def _fwd_impl(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


_fwd = jax.jit(_fwd_impl, static_argnames=("graphdef",))


def logits(model, ids):
    g, s = nnx.split(model)
    return np.asarray(_fwd(g, s, ids))


IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)


def randomize_b(model, seed=1, std=0.3):
    rng = np.random.default_rng(seed)
    for blk in model.blocks:
        for name in model.targets:
            m = blk.get(name)
            m.lora_b[...] = jnp.asarray(std * rng.standard_normal(m.lora_b[...].shape), jnp.float32)
            m.router[...] = jnp.asarray(rng.standard_normal(m.router[...].shape), jnp.float32)


# -- forward ------------------------------------------------------------------------------

def test_init_equals_base():
    base = make_base()
    want = logits(base, IDS)
    moe = MoELoraModel(base, EXPERTS, rank=RANK, alpha=ALPHA)
    np.testing.assert_allclose(logits(moe, IDS), want, atol=2e-5, rtol=1e-5)
    # trainable split = experts (LoRAParam) + routers (RouterParam) only
    _, train, rest = nnx.split(moe, TRAINABLE, ...)
    n = len(LINEARS)
    assert len(jax.tree.leaves(train)) == 3 * n * CFG.num_layers
    assert not nnx.state(moe.base, TRAINABLE)
    assert len(jax.tree.leaves(nnx.state(moe, RouterParam))) == n * CFG.num_layers


def _np_moe(x, W0, A, B, R, k, scale):
    """Independent float64 reference of y = x W0 + sum_{topk} p_j scale (x A_j) B_j."""
    x, W0, A, B, R = (np.asarray(v, np.float64) for v in (x, W0, A, B, R))
    x2 = x.reshape(-1, x.shape[-1])
    z = x2 @ R
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = x2 @ W0
    for n in range(x2.shape[0]):
        top = np.argsort(-p[n])[:k]
        g = p[n, top] / p[n, top].sum()
        for gj, j in zip(g, top):
            y[n] += gj * scale * (x2[n] @ A[j]) @ B[j]
    return y.reshape(*x.shape[:-1], -1), p


@pytest.mark.parametrize("layer,name", [(1, "q_proj"), (2, "down_proj"), (0, "up_proj")])
def test_linear_matches_numpy(layer, name):
    moe = MoELoraModel(make_base(), EXPERTS, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(3))
    randomize_b(moe)
    d_in, _ = CFG.linear_shape(name)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, d_in)), jnp.float32)
    got = np.asarray(moe.linear_output(layer, name, x))
    m = moe.blocks[layer].get(name)
    W0 = moe.base.layers.linears()[name].kernel[...][layer]
    want, _ = _np_moe(x, W0, m.lora_a[...], m.lora_b[...], m.router[...], moe.top_k[layer],
                      ALPHA / RANK)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert not np.allclose(got, np.asarray(x) @ np.asarray(W0), atol=1e-3)  # experts matter


def test_moe_delta_top1_of_4_and_balance_loss():
    rng = np.random.default_rng(7)
    s, d_in, r, d_out, N = 4, 6, 2, 5, 9
    x = rng.standard_normal((N, d_in)).astype(np.float32)
    A = rng.standard_normal((s, d_in, r)).astype(np.float32)
    B = rng.standard_normal((s, r, d_out)).astype(np.float32)
    R = rng.standard_normal((d_in, s)).astype(np.float32)
    w = (np.arange(N) < 7).astype(np.float32)  # the last two tokens are padding
    d, aux = moe_delta(jnp.asarray(x), jnp.asarray(A), jnp.asarray(B), jnp.asarray(R), top_k=1,
                       scale=1.5, dtype=jnp.float32, token_weight=jnp.asarray(w))
    want, p = _np_moe(x, np.zeros((d_in, d_out)), A, B, R, 1, 1.5)
    np.testing.assert_allclose(np.asarray(d), want, rtol=2e-4, atol=2e-4)
    real = w > 0
    f = np.bincount(p[real].argmax(1), minlength=s) / real.sum()
    P = p[real].mean(0)
    np.testing.assert_allclose(float(aux), s * np.sum(f * P), rtol=1e-5)


def test_one_expert_per_layer_equals_plain_lora():
    base = make_base()
    moe = MoELoraModel(nnx.clone(base), [1, 1, 1], rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(2))
    assert moe.top_k == (1, 1, 1)
    randomize_b(moe)
    lora = apply_lora(nnx.clone(base), LoraConfig(rank=RANK, alpha=ALPHA))
    for name, lin in lora.layers.linears().items():
        lin.lora_a[...] = jnp.stack([moe.blocks[l].get(name).lora_a[...][0] for l in range(3)])
        lin.lora_b[...] = jnp.stack([moe.blocks[l].get(name).lora_b[...][0] for l in range(3)])
    want = logits(lora, IDS)
    np.testing.assert_allclose(logits(moe, IDS), want, atol=1e-4, rtol=1e-4)
    assert not np.allclose(want, logits(base, IDS), atol=1e-2)


def test_bad_counts_and_top_k():
    base = make_base()
    with pytest.raises(LayerIFError, match="3 layers"):
        MoELoraModel(base, [2, 2], rank=RANK)
    with pytest.raises(LayerIFError, match=">= 1 expert"):
        MoELoraModel(base, [2, 0, 2], rank=RANK)
    with pytest.raises(LayerIFError, match="exceeds"):
        MoELoraModel(base, EXPERTS, top_k=2)          # layer 0 has one expert
    with pytest.raises(LayerIFError, match="exceeds"):
        resolve_top_k([4, 2], [3, 3])
    assert resolve_top_k([1, 3, 2]) == [1, 2, 2]
    assert MoELoraModel(base, [4, 3, 2], top_k=1).top_k == (1, 1, 1)
    with pytest.raises(LayerIFError, match="merge it first"):
        MoELoraModel(apply_lora(make_base(), LoraConfig(rank=2)), EXPERTS)


# -- training, resume, adapter --------------------------------------------------------------

RUN = TrainConfig(epochs=12, lr=1e-2, warmup_steps=2, batch_size=2, grad_accum=2, max_len=16,
                  checkpoint_every=5)


def examples(n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(3, CFG.vocab_size, 6 + i % 5).astype(np.int32)
        out.append(Example(ids, np.arange(len(ids)) >= 1))
    return out


def fresh():
    return MoELoraModel(make_base(), EXPERTS, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(11))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_run")
    moe = fresh()
    before = nnx.state(moe)
    before = jax.tree.map(lambda x: np.asarray(x), before)
    hist = train_moe(moe, examples(), out, RUN)
    return moe, hist, out, before


def test_training_memorises_and_only_trains_experts(trained):
    moe, hist, out, before = trained
    assert hist["completed"] and hist["step"] == RUN.epochs * 2
    first, last = hist["epochs"][0]["train_loss"], hist["epochs"][-1]["train_loss"]
    assert last < 0.5 * first, (first, last)
    after = jax.tree.map(lambda x: np.asarray(x), nnx.state(moe))
    # base unchanged, every B and every multi-expert router changed
    for (path, x0), (_, x1) in zip(jax.tree_util.tree_leaves_with_path(before),
                                   jax.tree_util.tree_leaves_with_path(after)):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[0] == "base":
            np.testing.assert_array_equal(x0, x1)
        elif "lora_b" in keys:
            assert np.abs(x1).max() > 0
        elif "router" in keys and x0.shape[-1] > 1:
            assert not np.array_equal(x0, x1)
    assert (out / "adapter" / "moe_config.json").is_file()
    assert json.loads((out / "train_state.json").read_text())["status"] == "complete"


def test_resume_equals_uninterrupted(trained, tmp_path):
    moe, hist, _, _ = trained
    m2 = fresh()
    h1 = train_moe(m2, examples(), tmp_path, RUN, max_steps=7)  # checkpoint mid-epoch
    assert not h1["completed"] and h1["step"] == 7
    m3 = fresh()  # a new process: fresh model, resume from disk
    h2 = train_moe(m3, examples(), tmp_path, RUN)
    assert h2["resumed_from"] == 7 and h2["completed"]
    np.testing.assert_allclose(h2["train_loss"], hist["train_loss"], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(nnx.state(m3, TRAINABLE)),
                    jax.tree.leaves(nnx.state(moe, TRAINABLE))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # a different run in the same dir is refused
    other = TrainConfig(**{**RUN.__dict__, "lr": 2e-2})
    with pytest.raises(LayerIFError, match="different run"):
        train_moe(fresh(), examples(), tmp_path, other)


def test_adapter_round_trip_and_mismatch(trained, tmp_path):
    moe, _, out, _ = trained
    want = logits(moe, IDS)
    loaded = load_moe_adapter(make_base(), out)  # a train_moe output dir is accepted
    assert loaded.experts == tuple(EXPERTS) and loaded.top_k == moe.top_k
    np.testing.assert_allclose(logits(loaded, IDS), want, atol=1e-5, rtol=1e-5)
    save_moe_adapter(loaded, tmp_path / "ad")
    again = load_moe_adapter(fresh(), tmp_path / "ad")  # into an existing MoE model
    np.testing.assert_allclose(logits(again, IDS), want, atol=1e-5, rtol=1e-5)

    with pytest.raises(LayerIFError, match="do not match"):
        load_moe_adapter(MoELoraModel(make_base(), [2, 2, 2], rank=RANK), tmp_path / "ad")
    two = ModelConfig(**{**CFG.__dict__, "num_layers": 2})
    with pytest.raises(LayerIFError, match="3 layers.*2 layers"):
        load_moe_adapter(Decoder(two, rngs=nnx.Rngs(0)), tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "moe_config.json").read_text())
    meta["experts"] = [1, 2, 3]  # same layer count, counts do not fit the tensors
    meta["top_k"] = None
    (tmp_path / "ad" / "moe_config.json").write_text(json.dumps(meta))
    with pytest.raises(LayerIFError, match="shape"):
        load_moe_adapter(make_base(), tmp_path / "ad")
    with pytest.raises(LayerIFError, match="no MoE adapter"):
        load_moe_adapter(make_base(), tmp_path)


# -- evaluation ------------------------------------------------------------------------------

def _real_outputs(pattern, n=3):
    files = sorted(TASKS.glob(pattern))
    if not files:
        return []
    recs = json.loads(files[0].read_text())
    return [(r["output"], r["answer"]) for r in recs[:200:67][:n]]


def test_extract_answer():
    qa = [("Answer: The answer is D.", "D"), ("Answer: The answer is A.", "A")]
    qa += _real_outputs("qa_openbook_test_all.json") + _real_outputs("qa_commonq_test_all.json")
    for text, gold in qa:
        assert extract_answer(text, "qa_openbook_test_all.json") == gold
    assert extract_answer(" Answer: the answer is (C) because", "qa_commonq") == "C"
    assert extract_answer("Answer: B", "qa_text_scienceq_test_all") == "B"
    assert extract_answer("I do not know", "qa_openbook") is None
    glue = [("Answer: not equivalent.", "not equivalent", "glue_mrpc_test.json"),
            ("Answer: equivalent.", "equivalent", "glue_mrpc_test.json"),
            ("Answer: unacceptable.", "unacceptable", "glue_cola_test.json"),
            ("Answer: acceptable.", "acceptable", "glue_cola_test.json"),
            ("Answer: not entailment.", "not entailment", "glue_rte_test.json")]
    for pat in ("glue_mrpc_test.json", "glue_cola_test.json", "glue_rte_test.json"):
        glue += [(t, g, pat) for t, g in _real_outputs(pat)]
    for text, gold, task in glue:
        assert extract_answer(text, task) == gold, (text, task)
    assert extract_answer("it is Not Entailment, I think", "glue_rte") == "not entailment"
    assert extract_answer("no idea", "glue_cola") is None


class CharTok:
    """A tiny character tokenizer (ids 3..) for the generation smoke test."""
    chars = " abcdefghijklmnopqrstuvwxyzABCDE.:?\n"
    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text):
        return {"input_ids": [1] + [3 + self.chars.index(c) for c in text if c in self.chars]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i - 3] for i in ids if 3 <= i < 3 + len(self.chars))


def test_generate_and_accuracy_smoke(trained, tmp_path):
    moe = trained[0]
    tok = CharTok()
    text = generate_answer(moe, tok, "Question: q?\nOptions: (A) a (B) b\n", max_new_tokens=4)
    assert isinstance(text, str) and len(text) <= 4
    recs = [{"instruction": "Question: a?\nOptions: (A) x (B) y\n", "input": "",
             "output": "Answer: The answer is B.", "answer": "B",
             "choices": {"label": ["A", "B"], "text": ["x", "y"]}},
            {"instruction": "Question: b?\nOptions: (A) x (B) y\n", "input": "",
             "output": "Answer: The answer is A.", "answer": "A",
             "choices": {"label": ["A", "B"], "text": ["x", "y"]}}]
    path = tmp_path / "qa_tiny_test.json"
    path.write_text(json.dumps(recs))
    res = accuracy(moe, tok, path, mode="loglik", batch_size=4)
    assert res["n"] == 2 and res["unparsed"] == 0 and set(res["predictions"]) <= {"A", "B"}
    # batch 1 and the same padded length as above: the compiled step is reused
    res = accuracy(moe, tok, path, limit=1, mode="generate", batch_size=1, max_new_tokens=3)
    assert res["n"] == 1 and 0.0 <= res["accuracy"] <= 1.0


# -- CLI input checks ------------------------------------------------------------------------

def test_allocation_file_checks(tmp_path):
    from layerif_jax.applications.moe import read_allocation

    p = tmp_path / "alloc.json"
    p.write_text(json.dumps({"experts": [1, 3, 2], "total": 6, "top_k": [1, 2, 2]}))
    assert read_allocation(p, 3) == ([1, 3, 2], [1, 2, 2])
    with pytest.raises(LayerIFError, match="4 layers"):
        read_allocation(p, 4)
    with pytest.raises(LayerIFError, match="exceeds"):
        read_allocation(p, 3, top_k=2)
    p.write_text(json.dumps({"experts": [1, 3, 2], "total": 7}))
    with pytest.raises(LayerIFError, match="total"):
        read_allocation(p, 3)
    p.write_text(json.dumps({"counts": [1]}))
    with pytest.raises(LayerIFError, match="'experts'"):
        read_allocation(p, 1)
    # `layerif run`'s allocation.json: one allocation per method
    p.write_text(json.dumps({"experts": {"layerif": [1, 4, 1], "uniform": [2, 2, 2]},
                             "top_k": {"layerif": [1, 2, 1], "uniform": [2, 2, 2]},
                             "total": 6}))
    assert read_allocation(p, 3, method="layerif") == ([1, 4, 1], [1, 2, 1])
    with pytest.raises(LayerIFError, match="layerif, uniform: pick one with --allocation"):
        read_allocation(p, 3)
    with pytest.raises(LayerIFError, match="'mola' is not one of them"):
        read_allocation(p, 3, method="mola")
