"""Perplexity and zero-shot multiple choice on a tiny random decoder."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerif_jax.errors import LayerIFError
from layerif_jax.evaluation import mc_accuracy, mc_item, perplexity
from layerif_jax.models.config import ModelConfig
from layerif_jax.models.decoder import Decoder
from conftest import word_tokenizer  # noqa: E402

CFG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "layerif-tasks"


def tiny_tokenizer(n_words=57):
    return word_tokenizer(n_words)

@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_pair(tiny_hf_model, to_layerif):
    """(transformers torch model, the same weights as a layerif Decoder): the torch model
    is the reference for every log-likelihood below."""
    pytest.importorskip("torch")
    hf = tiny_hf_model("llama", seed=0)
    return hf, to_layerif(hf)


def torch_logprobs(hf, ids):
    import torch
    with torch.no_grad():
        logits = hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.double()
    return torch.log_softmax(logits, -1).numpy()


# ------------------------------------------------------------------ perplexity
def test_perplexity_matches_transformers_loss(hf_pair, tok, tmp_path):
    import torch

    hf, model = hf_pair
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in rng.integers(0, 57, size=103))
    p = tmp_path / "wiki.raw"
    p.write_text(text)
    ids = np.asarray(tok(text)["input_ids"])
    for window, max_tokens, bs in ((16, None, 4), (10, 50, 2)):
        res = perplexity(model, tok, p, window=window, max_tokens=max_tokens, batch_size=bs,
                         progress=False)
        use = ids[:max_tokens] if max_tokens else ids
        n_win = use.size // window
        wins = torch.from_numpy(use[: n_win * window].reshape(n_win, window).astype(np.int64))
        with torch.no_grad():  # transformers' own shifted mean cross-entropy, per window
            nll = np.mean([float(hf(w[None], labels=w[None]).loss) for w in wins])
        assert res["n_windows"] == n_win and res["n_tokens"] == n_win * (window - 1)
        assert res["nll"] == pytest.approx(nll, rel=1e-5)
        assert res["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_perplexity_errors(model, tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("w1 w2 w3")
    with pytest.raises(LayerIFError, match="fewer than one window"):
        perplexity(model, tok, p, window=8, progress=False)
    with pytest.raises(LayerIFError, match="window must be"):
        perplexity(model, tok, p, window=1, progress=False)
    with pytest.raises(LayerIFError, match="not found"):
        perplexity(model, tok, tmp_path / "nope.txt", window=4, progress=False)
    with pytest.raises(LayerIFError, match="exceeds the model's context"):
        perplexity(model, tok, p, window=10**6, progress=False)


# ------------------------------------------------------------------ multiple choice
def _task(tmp_path, gold_short=True):
    """Three records, one per file format; the gold candidate is the one with the
    fewest tokens (gold_short) or the most."""
    a, z = ("A", "C") if gold_short else ("C", "A")
    recs = [
        {"question": "w10 w11 w12", "choices": {"label": ["A", "B", "C"],
                                                "text": ["w1", "w2 w3", "w4 w5 w6"]},
         "answerKey": a, "answer": a, "instruction": "Question: w10 w11 w12\nOptions: ...\n",
         "output": f"Answer: The answer is {a}."},
        {"question": "w13 w14", "choices": ["w20", "w21 w22 w23", "w24 w25"],
         "answer": "A" if gold_short else "B"},
        {"input": "", "instruction": "Tell me if the statements w7, w8 w9.\nSentence 1: w30\n",
         "output": f"Answer: {'w7' if gold_short else 'w8 w9'}.",
         "answer": "w7" if gold_short else "w8 w9"},
    ]
    p = tmp_path / f"task_{gold_short}.json"
    p.write_text(json.dumps(recs))
    return p


def test_mc_accuracy_forced(tok, tmp_path):
    flat = Decoder(CFG, rngs=nnx.Rngs(1))
    flat.norm.set_value(jnp.zeros_like(flat.norm[...]))  # logits 0: log p = -log V per token
    res = mc_accuracy(flat, tok, _task(tmp_path, True), progress=False, details=True)
    assert res["n"] == 3 and res["accuracy"] == 1.0
    np.testing.assert_allclose(res["scores"][0], -np.log(61) * np.array([1, 2, 3]), rtol=1e-5)
    res = mc_accuracy(flat, tok, _task(tmp_path, False), progress=False, batch_size=2)
    assert res["accuracy"] == 0.0
    assert mc_accuracy(flat, tok, _task(tmp_path, True), limit=2, progress=False)["n"] == 2


def test_mc_scores_match_transformers(hf_pair, tok, tmp_path):
    hf, model = hf_pair
    p = _task(tmp_path)
    res = mc_accuracy(model, tok, p, progress=False, details=True, batch_size=3)
    recs = json.loads(p.read_text())
    seqs = []  # (record, candidate, ids, first candidate position)
    for i, rec in enumerate(recs):
        prompt, cands, gold = mc_item(rec)
        assert gold == res["gold"][i]
        for j, c in enumerate(cands):
            pi = tok(prompt)["input_ids"]
            ci = tok(c, add_special_tokens=False)["input_ids"]
            seqs.append((i, j, pi + ci, len(pi)))
    T = max(len(s[2]) for s in seqs)
    batch = np.zeros((len(seqs), T), np.int64)  # right padding: causal, earlier logits unchanged
    for r, s in enumerate(seqs):
        batch[r, :len(s[2])] = s[2]
    lp = torch_logprobs(hf, batch)
    for r, (i, j, ids, start) in enumerate(seqs):
        want = sum(lp[r, t - 1, ids[t]] for t in range(start, len(ids)))
        assert res["scores"][i][j] == pytest.approx(want, rel=1e-5, abs=1e-5)
    pred = [int(np.argmax(s)) for s in res["scores"]]
    assert res["accuracy"] == pytest.approx(np.mean(np.array(pred) == res["gold"]))


def test_mc_item_candidates():
    qa = {"question_stem": "Fog is near", "choices": {"text": ["a marsh", "a desert"],
                                                      "label": ["A", "B"]},
          "answerKey": "B", "instruction": "Question: Fog is near\nOptions: (A) a marsh (B) a desert\n",
          "output": "Answer: The answer is B."}
    assert mc_item(qa) == ("Question: Fog is near\nAnswer:", [" a marsh", " a desert"], 1)
    prompt, cands, gold = mc_item(qa, style="letter")
    assert prompt == qa["instruction"] and gold == 1
    assert cands == [" Answer: The answer is A.", " Answer: The answer is B."]
    rte = {"instruction": "Tell me if the statements entailment, not entailment.\nSentence 1: x\n",
           "output": "Answer: not entailment.", "answer": "not entailment", "input": ""}
    assert mc_item(rte)[1:] == ([" Answer: entailment.", " Answer: not entailment."], 1)
    with pytest.raises(LayerIFError, match="not one of the labels"):
        mc_item(dict(qa, answerKey="E"))
    with pytest.raises(LayerIFError, match="not a multiple-choice record"):
        mc_item({"text": "hello"})
    with pytest.raises(LayerIFError, match="unknown style"):
        mc_item(qa, style="bogus")


def test_mc_errors(model, tok, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"instruction": "w1", "output": "w2"}]))
    with pytest.raises(LayerIFError, match="not a multiple-choice record"):
        mc_accuracy(model, tok, p, progress=False)
    with pytest.raises(LayerIFError, match="not found"):
        mc_accuracy(model, tok, tmp_path / "missing.json", progress=False)


@pytest.mark.skipif(not TASKS.is_dir(), reason=f"task files not found at {TASKS}")
@pytest.mark.parametrize("name", ["glue_rte_test.json", "glue_mrpc_test.json",
                                  "glue_cola_test.json", "qa_openbook_test_all.json",
                                  "qa_commonq_test_all.json", "qa_text_scienceq_test_all.json"])
def test_shared_task_records_parse(name):
    from layerif_jax.data import load_records
    rec = load_records(TASKS / name, limit=1)[0]
    prompt, cands, gold = mc_item(rec, style="letter")
    assert cands[gold] == " " + rec["output"] and len(cands) >= 2
    assert prompt.startswith(rec["instruction"].split("\n")[0])
    if "choices" in rec:
        _, cands, gold = mc_item(rec, style="text")
        texts = rec["choices"]["text"] if isinstance(rec["choices"], dict) else rec["choices"]
        assert cands == [" " + t for t in texts]


def test_cli_eval(model, tok, tmp_path, capsys):
    from layerif_jax.cli import main
    from layerif_jax.formats import export_hf
    d = export_hf(model, tmp_path / "tiny", tokenizer=tok)

    def run(argv):
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    text = tmp_path / "t.raw"
    text.write_text(" ".join(f"w{i % 57}" for i in range(40)))
    res = run(["-q", "eval", "ppl", "--model", str(d), "--data", str(text), "--window", "16",
               "--out", str(tmp_path / "ppl.json")])
    want = perplexity(model, tok, text, window=16, progress=False)
    assert res["n_windows"] == want["n_windows"] == 2
    assert res["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert saved.pop("written_by") == "layerif eval ppl" and saved == res
    task = _task(tmp_path)
    res = run(["-q", "eval", "mc", "--model", str(d), "--task", str(task), str(task),
               "--limit", "2"])
    want = mc_accuracy(model, tok, task, 2, progress=False)
    assert [t["n"] for t in res["tasks"]] == [2, 2]
    assert res["tasks"][0]["accuracy"] == want["accuracy"]
    assert res["mean_accuracy"] == want["accuracy"]
