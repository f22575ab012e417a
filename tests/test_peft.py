"""PEFT adapter round trips against the real `peft` library on a tiny Llama."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from layerif_jax.io import MANIFEST  # noqa: E402
from layerif_jax.errors import LayerIFError  # noqa: E402
from layerif_jax.models.lora import LoraConfig, apply_lora  # noqa: E402
from layerif_jax.formats.peft import (  # noqa: E402
    CONFIG_NAME, WEIGHTS_NAME, load_adapter, load_peft_adapter, save_peft_adapter)

VOCAB = 97


@pytest.fixture(scope="module")
def tiny(tiny_hf_model, to_layerif):
    """(torch base Llama with every weight perturbed, a factory of our copies of it)."""
    tm = tiny_hf_model("llama", seed=0)
    return tm, lambda: to_layerif(tm)


def ids():
    return np.random.default_rng(3).integers(0, VOCAB, (2, 11)).astype(np.int64)


def torch_logits(m, x):
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(x)).logits.float().numpy()


def jax_logits(model, x):
    with jax.default_matmul_precision("highest"):  # no TF32 when run on a GPU
        return np.asarray(model(jnp.asarray(x, jnp.int32)))


def close(a, b, rel=1e-4):
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err <= rel, err


def randomize_lora(model, seed):
    """Nonzero A and B (B is zero at init)."""
    key = jax.random.key(seed)
    for lin in model.layers.linears().values():
        if lin.lora_a is None:
            continue
        key, ka, kb = jax.random.split(key, 3)
        lin.lora_a.set_value(0.2 * jax.random.normal(ka, lin.lora_a.shape))
        lin.lora_b.set_value(0.2 * jax.random.normal(kb, lin.lora_b.shape))


def test_ours_to_peft(tiny, tmp_path):
    tm, ours = tiny
    model = ours()
    base = jax_logits(model, ids())
    close(base, torch_logits(tm, ids()))  # the base models agree to begin with
    apply_lora(model, LoraConfig(rank=4, alpha=12, targets=("q", "v", "o", "gate", "down")),
               rngs=nnx.Rngs(1))
    randomize_lora(model, 7)
    ref = jax_logits(model, ids())
    assert np.max(np.abs(ref - base)) > 1e-2  # the adapter matters
    out = save_peft_adapter(model, tmp_path / "ad", base_model_name="tiny-llama")
    conf = json.loads((out / CONFIG_NAME).read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 12 and conf["peft_type"] == "LORA"
    assert conf["target_modules"] == ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    assert not list(tmp_path.glob(".ad*"))  # no temp dir left behind
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(out)).eval()
    close(ref, torch_logits(pm, ids()))
    # and it loads back into ours unchanged
    again = load_peft_adapter(ours(), out)
    np.testing.assert_array_equal(jax_logits(again, ids()), ref)
    # saving again over an existing dir replaces it
    save_peft_adapter(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, MANIFEST])


def peft_adapter(tm, path, targets, r=4, alpha=8, seed=0):
    pm = peft.get_peft_model(copy.deepcopy(tm), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.05,
        task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


def test_peft_to_ours(tiny, tmp_path):
    tm, ours = tiny
    pm = peft_adapter(tm, tmp_path / "p", ["q_proj", "k_proj", "up_proj", "down_proj"], alpha=16)
    model = load_peft_adapter(ours(), tmp_path / "p")
    lc = model.lora_config
    assert (lc.rank, lc.alpha, lc.dropout) == (4, 16.0, 0.05)
    assert lc.targets == ("q_proj", "k_proj", "up_proj", "down_proj")
    assert model.layers.v_proj.lora_a is None
    close(jax_logits(model, ids()), torch_logits(pm, ids()))

    # in-memory key forms (".default", no "base_model.model." prefix) load too
    from safetensors.numpy import load_file, save_file
    w = load_file(str(tmp_path / "p" / WEIGHTS_NAME))
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / CONFIG_NAME).write_text((tmp_path / "p" / CONFIG_NAME).read_text())
    renamed = {k.replace("base_model.model.", "", 1).replace(".weight", ".default.weight"): v
               for k, v in w.items()}
    save_file(renamed, str(alt / WEIGHTS_NAME))
    m2 = load_peft_adapter(ours(), alt)
    close(jax_logits(m2, ids()), torch_logits(pm, ids()))
    # a bfloat16 adapter file (numpy cannot hold bf16: read directly)
    from safetensors.torch import load_file as tload, save_file as tsave
    tsave({k: v.to(torch.bfloat16) for k, v in tload(str(alt / WEIGHTS_NAME)).items()},
          str(alt / WEIGHTS_NAME))
    m2b = load_peft_adapter(ours(), alt)
    for name in lc.targets:
        for which in ("lora_a", "lora_b"):
            got = getattr(getattr(m2b.layers, name), which)[...]
            ref = getattr(getattr(m2.layers, name), which)[...]
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(got, ref.astype(jnp.bfloat16).astype(jnp.float32))

    # a finetune output dir (adapter/ inside) and replacing an adapter with other targets
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "p").rename(run / "adapter")
    m3 = ours()
    apply_lora(m3, LoraConfig(rank=2, targets=("v", "o")))
    load_adapter(m3, run)
    assert m3.layers.v_proj.lora_a is None and m3.layers.o_proj.lora_a is None
    close(jax_logits(m3, ids()), torch_logits(pm, ids()))


def _edit_config(path, **kw):
    p = path / CONFIG_NAME
    c = json.loads(p.read_text())
    c.update(kw)
    p.write_text(json.dumps(c))


def test_errors(tiny, tmp_path):
    tm, ours = tiny
    model = ours()
    apply_lora(model, LoraConfig(rank=4, targets=("q", "down")))
    randomize_lora(model, 1)
    good = save_peft_adapter(model, tmp_path / "good")

    def variant(name, **kw):
        d = tmp_path / name
        d.mkdir()
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            (d / f).write_bytes((good / f).read_bytes())
        _edit_config(d, **kw)
        return d

    fresh = ours()
    with pytest.raises(LayerIFError, match="c_attn.*matches no module"):
        load_peft_adapter(fresh, variant("unk", target_modules=["q_proj", "c_attn"]))
    with pytest.raises(LayerIFError, match="use_rslora"):
        load_peft_adapter(fresh, variant("rs", use_rslora=True))
    with pytest.raises(LayerIFError, match="DoRA"):
        load_peft_adapter(fresh, variant("dora", use_dora=True))
    with pytest.raises(LayerIFError, match="layers_to_transform"):
        load_peft_adapter(fresh, variant("ltt", layers_to_transform=[0, 1]))
    # rank in the config disagrees with the tensors: the error names the key
    with pytest.raises(LayerIFError, match=r"shape mismatch base_model\.model\.model\.layers\.0\."
                                           r"self_attn\.q_proj\.lora_A\.weight"):
        load_peft_adapter(fresh, variant("shape", r=8))
    # tensors for a module the config does not target
    with pytest.raises(LayerIFError, match="down_proj"):
        load_peft_adapter(fresh, variant("fewer", target_modules=["q_proj"]))
    with pytest.raises(LayerIFError, match="adapter directory not found"):
        load_peft_adapter(fresh, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerIFError, match="no adapter_config.json"):
        load_peft_adapter(fresh, tmp_path / "empty")
    nw = variant("noweights")
    (nw / WEIGHTS_NAME).unlink()
    with pytest.raises(LayerIFError, match="has no adapter_model.safetensors"):
        load_peft_adapter(fresh, nw)
    with pytest.raises(LayerIFError, match="neither a PEFT adapter dir"):
        load_adapter(fresh, tmp_path / "empty")
    # nothing was modified by the failed loads
    assert fresh.lora_config is None and fresh.layers.q_proj.lora_a is None
    with pytest.raises(LayerIFError, match="no LoRA"):
        save_peft_adapter(fresh, tmp_path / "x")
