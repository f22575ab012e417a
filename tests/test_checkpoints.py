"""Checkpoint I/O: HF safetensors (single, sharded, bf16), GGUF, the project's orbax
format, HF export (with merged or PEFT-layout LoRA), and the error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from layerif_jax.errors import LayerIFError  # noqa: E402
from layerif_jax.formats import (  # noqa: E402
    convert, export_hf, load_model, save_checkpoint)
from layerif_jax.models.lora import LoraConfig, apply_lora  # noqa: E402
from layerif_jax.models.params import model_to_tensors  # noqa: E402
from layerif_jax.models.tokenizer import check_vocab, load_tokenizer  # noqa: E402
from conftest import word_tokenizer  # noqa: E402

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@nnx.jit
def _fwd(model, ids):
    return model(ids)


def ours_logits(model, ids) -> np.ndarray:
    return np.asarray(_fwd(model, jnp.asarray(ids)))


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def st_tensors(d: Path) -> dict[str, np.ndarray]:
    """Every tensor of every .safetensors file in `d` (bf16 as uint16 bit patterns)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[k] = (v.view(torch.int16).numpy() if v.dtype == torch.bfloat16
                      else v.numpy())
    return out


def tiny_tokenizer():
    return word_tokenizer(60)

IDS = np.random.default_rng(0).integers(3, 97, size=(2, 9))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_hf_model):
    """A tiny untied Llama (with biases) saved by transformers, tokenizer included."""
    hf = tiny_hf_model("llama", seed=11, attention_bias=True)
    d = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(str(d))
    tiny_tokenizer().save_pretrained(str(d))
    return hf, d


# ------------------------------------------------------------------ HF safetensors
def test_load_hf_dir_parity(llama_dir):
    hf, d = llama_dir
    assert (d / "model.safetensors").is_file()
    model = load_model(d)
    assert model.dtype == jnp.float32 and model.cfg.o_bias and model.cfg.qkv_bias
    assert rel_err(ours_logits(model, IDS), hf_logits(hf, IDS)) <= TOL


def test_load_sharded_and_bf16(tmp_path, tiny_hf_model):
    hf = tiny_hf_model("qwen2", seed=12)  # tied embeddings, qkv bias
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    model = load_model(sharded)
    assert rel_err(ours_logits(model, IDS), hf_logits(hf, IDS)) <= TOL
    # tied embeddings: no lm_head written, same tensors as transformers' own save
    exp = export_hf(model, tmp_path / "exp")
    a, b = st_tensors(sharded), st_tensors(exp)
    assert set(a) == set(b) and "lm_head.weight" not in b
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sorted(sharded.glob("model-*-of-*.safetensors"))[-1].unlink()
    with pytest.raises(LayerIFError, match="shard files listed in the index are missing"):
        load_model(sharded)

    # bf16 on disk: numpy's safetensors reader cannot build bf16 arrays
    b16 = tmp_path / "bf16"
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf16.save_pretrained(str(b16))
    ref = {k: v.float().numpy() for k, v in hf16.state_dict().items()}
    for dtype in ("float32", jnp.bfloat16):
        m = load_model(b16, dtype=dtype)
        assert m.dtype == jnp.dtype(dtype)
        got = model_to_tensors(m, jnp.float32)
        for k, v in got.items():
            np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_roundtrip_convert_export_bit_exact(llama_dir, tmp_path):
    hf, src = llama_dir
    conv = convert(src, tmp_path / "conv")
    meta = json.loads((conv / "config.json").read_text())
    assert meta["layerif_jax_format"] == 1
    tok = load_tokenizer(conv)
    assert tok.encode("w1 w2 w3") == tiny_tokenizer().encode("w1 w2 w3")
    model = load_model(conv)
    check_vocab(tok, model.cfg)
    out = export_hf(model, tmp_path / "export", tokenizer=tok)
    a, b = st_tensors(src), st_tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k
    hf2 = hf_load(out)
    np.testing.assert_array_equal(hf_logits(hf2, IDS), hf_logits(hf, IDS))
    assert load_tokenizer(out).encode("w5") == tok.encode("w5")
    # nothing left behind by the atomic writers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_sharded_bf16(llama_dir, tmp_path):
    hf, src = llama_dir
    model = load_model(src)
    out = export_hf(model, tmp_path / "exp", dtype="bfloat16", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_model(out, dtype="bfloat16")
    hf16 = {k: v.view(torch.int16).numpy()
            for k, v in copy.deepcopy(hf).to(torch.bfloat16).state_dict().items()}
    for k, v in model_to_tensors(back).items():
        assert np.array_equal(v.view(np.int16), hf16[k]), k
    assert rel_err(hf_logits(hf_load(out), IDS), hf_logits(hf, IDS)) <= 5e-2


# ------------------------------------------------------------------ own format + LoRA
def _lora_model(src):
    model = load_model(src)
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down")),
               rngs=nnx.Rngs(3))
    rng = np.random.default_rng(5)
    for lin in model.layers.linears().values():
        if lin.lora_b is not None:
            lin.lora_b[...] = jnp.asarray(rng.normal(0, 0.2, lin.lora_b.shape), jnp.float32)
    return model


def test_lora_save_restore_and_export(llama_dir, tmp_path):
    from peft import PeftModel

    hf, src = llama_dir
    model = _lora_model(src)
    want = ours_logits(model, IDS)
    assert rel_err(want, hf_logits(hf, IDS)) > 1e-2  # the adapters do something

    ck = save_checkpoint(model, tmp_path / "ck")
    back = load_model(ck)
    assert back.lora_config == LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
    s1, s2 = nnx.state(model), nnx.state(back)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert isinstance(y, jax.Array)  # restored to the device, not as host numpy
        assert x.dtype == y.dtype and np.array_equal(x, y)
    np.testing.assert_array_equal(ours_logits(back, IDS), want)

    merged = export_hf(model, tmp_path / "merged")
    assert model.layers.q_proj.lora_a is not None  # the model is not modified
    assert rel_err(hf_logits(hf_load(merged), IDS), want) <= TOL

    unmerged = export_hf(model, tmp_path / "peft", merge_lora=False)
    assert (unmerged / "adapter" / "adapter_config.json").is_file()
    base = hf_load(unmerged)
    np.testing.assert_array_equal(hf_logits(base, IDS), hf_logits(hf, IDS))
    peft_model = PeftModel.from_pretrained(base, str(unmerged / "adapter")).eval()
    assert rel_err(hf_logits(peft_model, IDS), want) <= TOL


def test_own_format_bf16_and_overwrite(llama_dir, tmp_path):
    _, src = llama_dir
    out = convert(src, tmp_path / "c16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["layerif_jax_dtype"] == "bfloat16"
    m16 = load_model(out, dtype="bfloat16")
    m32 = load_model(src)
    assert m16.dtype == jnp.bfloat16
    for k, v in model_to_tensors(m16, jnp.float32).items():
        ref = model_to_tensors(m32, jnp.bfloat16)[k].astype(np.float32)
        np.testing.assert_array_equal(v, ref, err_msg=k)
    save_checkpoint(m32, out)                 # its own earlier output: replaced
    assert load_model(out).dtype == jnp.float32
    (out / "notes.txt").write_text("mine")    # a file of the user's: refused, then kept
    with pytest.raises(LayerIFError, match=r"did not write \(notes.txt\)"):
        save_checkpoint(m16, out)
    save_checkpoint(m16, out, overwrite=True)
    assert load_model(out, dtype="bfloat16").dtype == jnp.bfloat16
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_own_format_checksums_catch_changed_arrays(llama_dir, tmp_path):
    """An array whose bytes no longer match the SHA-256 stored at save time (bit rot that
    still decodes; here the stored digest changes instead), or one the digests do not
    list, is refused naming it."""
    import re
    _, src = llama_dir
    out = convert(src, tmp_path / "c")
    meta = json.loads((out / "config.json").read_text())
    names = sorted(meta["layerif_jax_digests"])
    meta["layerif_jax_digests"][names[3]] = "0" * 64
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LayerIFError, match=re.escape(names[3]) + " does not match its stored"):
        load_model(out)
    del meta["layerif_jax_digests"][names[3]]
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(LayerIFError, match=re.escape(names[3]) + " does not match its stored"):
        load_model(out)


def test_failed_write_leaves_nothing(llama_dir, tmp_path):
    _, src = llama_dir

    class BadTokenizer:
        def save_pretrained(self, d):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(load_model(src), tmp_path / "ck", tokenizer=BadTokenizer())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ GGUF (written here)
def write_gguf(path: Path, hf, arch: str, quant=None):
    """A GGUF of a transformers model (conftest.write_gguf)."""
    from conftest import write_gguf as write
    return write(path, hf.config.to_dict(),
                 {k: v.float().numpy() for k, v in hf.state_dict().items()}, arch, quant)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_gguf_families(family, tmp_path, tiny_hf_model):
    hf = tiny_hf_model(family, seed=20)
    path = write_gguf(tmp_path / f"{family}.gguf", hf, family)
    model = load_model(path)
    assert model.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    for k, v in model_to_tensors(model).items():
        if family == "gemma" and k.endswith("norm.weight"):  # (1 + w) - 1 rounds
            np.testing.assert_allclose(v, ref[k], atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(v, ref[k], err_msg=k)
    assert rel_err(ours_logits(model, IDS), hf_logits(hf, IDS)) <= TOL
    if family == "llama":
        # the permutation convention agrees with transformers' own GGUF loader
        from transformers import AutoModelForCausalLM

        hf_g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
        assert rel_err(hf_logits(hf_g, IDS), hf_logits(hf, IDS)) <= TOL


def test_gguf_quantised(tmp_path, tiny_hf_model):
    import gguf

    hf = tiny_hf_model("llama", seed=21)
    path = write_gguf(tmp_path / "q8.gguf", hf, "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    model = load_model(path, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    got = model_to_tensors(model, jnp.float32)
    for k in ("model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        assert rel_err(got[k], ref[k]) < 2e-2  # Q8_0 + bf16 rounding, rows in place
    assert rel_err(ours_logits(model, IDS), hf_logits(hf, IDS)) < 0.1


# ------------------------------------------------------------------ errors
def test_errors(tmp_path, llama_dir, tiny_hf_model):
    hf, src = llama_dir
    with pytest.raises(LayerIFError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(LayerIFError, match="unknown checkpoint format"):
        load_model(tmp_path / "junk.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerIFError, match="unknown checkpoint format"):
        load_model(tmp_path / "empty")
    with pytest.raises(LayerIFError, match="unsupported dtype"):
        load_model(src, dtype="float16")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(LayerIFError, match="unsupported architecture 'gpt2'"):
        load_model(gpt2)

    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LayerIFError, match="unsupported GGUF architecture 'phi3'"):
        load_model(tmp_path / "phi.gguf")

    # a missing tensor AND a wrong shape are reported together, on one line
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(LayerIFError) as ei:
        load_model(bad)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "1 missing keys (model.layers.1.mlp.up_proj.weight)" in msg
    assert "model.layers.2.self_attn.o_proj.weight" in msg and "shape" in msg
    # read into shards (headers only before any tensor): the same one line
    import jax
    from layerif_jax.sharding import make_mesh
    with pytest.raises(LayerIFError) as ei2:
        load_model(bad, mesh=make_mesh((1, 1), jax.devices()[:1]), sharding="fsdp")
    assert str(ei2.value) == msg

    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LayerIFError, match="cannot read"):
        load_model(bad)

    with pytest.raises(LayerIFError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
    model = load_model(src)
    small = dict(vars(model.cfg), vocab_size=10)
    with pytest.raises(LayerIFError, match="tokenizer has 64 tokens"):
        check_vocab(tiny_tokenizer(), type(model.cfg)(**small))
