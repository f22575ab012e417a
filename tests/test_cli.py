"""The `layerif` command end to end on a tiny model, and its handling of bad input."""

import json

import numpy as np
import pytest

from layerif_jax.cli import main

TASK = [{"instruction": f"Is {i} even? Answer:", "input": "", "output": "yes." if i % 2 == 0 else "no."}
        for i in range(12)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_gguf):
    """A tiny Llama (vocab 49152 to fit SmolLM2's tokenizer) saved as an HF directory."""
    import torch
    import transformers
    from layerif_jax import load_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    load_tokenizer(smollm2_gguf).save_pretrained(d)
    return d


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "task.json"
    p.write_text(json.dumps(TASK))
    return p


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_finetune_scores_allocate(tiny_dir, data, tmp_path, capsys):
    ft = tmp_path / "ft"
    code, out, err = run(capsys, "finetune", "--model", tiny_dir, "--data", data, "--out", ft,
                         "--epochs", 2, "--batch-size", 4, "--warmup", 1, "--lr", 1e-2, "--rank", 4)
    assert code == 0, err
    assert (ft / "adapter" / "adapter_config.json").is_file()
    sc = tmp_path / "sc"
    code, out, err = run(capsys, "scores", "--model", tiny_dir, "--lora", ft, "--train", data,
                         "--val", data, "--out", sc, "--n-train", 8, "--n-val", 3, "--per-val",
                         "--chunk-size", 2, "--chunks-per-call", 3)
    assert code == 0, err
    s = json.loads((sc / "scores.json").read_text())
    assert s["calls"] < s["chunks"], s      # --chunks-per-call grouped the chunks
    for key in ("layer_scores", "aggregate", "estimator", "n_train", "n_val", "seconds", "model", "adapter"):
        assert key in s
    assert s["n_train"] == 8 and s["n_val"] == 3 and len(s["layer_scores"]) == 2
    pe = np.load(sc / "per_example.npy")
    pv, pvl = np.load(sc / "per_val.npy"), np.load(sc / "per_val_layers.npy")
    assert pe.shape == (8, 2) and pv.shape == (8, 3) and pvl.shape == (8, 3, 2)
    np.testing.assert_allclose(pvl.sum(-1), pv, rtol=1e-6)
    np.testing.assert_allclose(pvl.mean(1), pe, rtol=1e-5, atol=1e-6 * np.abs(pe).max())
    assert np.allclose(s["layer_scores"], np.where(pe > 0, pe, 0).sum(0))
    assert (sc / "scores.png").stat().st_size > 1000

    code, out, err = run(capsys, "allocate", "experts", "--scores", sc / "scores.json",
                         "--total", 7, "--out", tmp_path / "e.json")
    assert code == 0, err
    alloc = json.loads((tmp_path / "e.json").read_text())
    assert sum(alloc["experts"]) == 7 and min(alloc["experts"]) >= 1
    code, out, err = run(capsys, "allocate", "sparsity", "--scores", sc / "scores.json",
                         "--config", tiny_dir / "config.json", "--sparsity", 0.5,
                         "--out", tmp_path / "s.json")
    assert code == 0, err
    assert len(json.loads((tmp_path / "s.json").read_text())["per_matrix"]) == 14


def test_convert_and_export(tiny_dir, tmp_path, capsys):
    code, _, err = run(capsys, "convert", tiny_dir, tmp_path / "ck")
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "ck", tmp_path / "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    ft = ["finetune", "--model", tiny_dir, "--out", out]
    _one_line_error(*run(capsys, *ft, "--data", tmp_path / "nope.json")[:3:2], "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": oops}\n')
    _one_line_error(*run(capsys, *ft, "--data", bad)[:3:2], "line 2")
    nofield = tmp_path / "nofield.json"
    nofield.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"question": "q"}]))
    _one_line_error(*run(capsys, *ft, "--data", nofield)[:3:2], "record 1")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    _one_line_error(*run(capsys, *ft, "--data", empty)[:3:2], "empty")
    _one_line_error(*run(capsys, *ft, "--data", data, "--targets", "q,attn")[:3:2], "'attn'")
    _one_line_error(*run(capsys, *ft, "--data", data, "--dropout", 1.5)[:3:2], "dropout")
    with pytest.raises(SystemExit) as e:   # argparse range checks also exit 2
        main([*map(str, ft), "--data", str(data), "--lr", "-1"])
    assert e.value.code == 2
    # unsupported architecture
    arch = tmp_path / "gpt2"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _one_line_error(*run(capsys, "convert", arch, tmp_path / "x")[:3:2], "gpt2")
    # a tokenizer whose vocabulary does not fit the model
    small = tmp_path / "small"
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["vocab_size"] = 1000
    small.mkdir()
    (small / "config.json").write_text(json.dumps(cfg))
    import shutil
    for f in tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, small / f.name)
    from layerif_jax.model.checkpoints import export_hf, load_model
    from layerif_jax.model.config import ModelConfig
    from layerif_jax.model.decoder import Decoder
    from flax import nnx
    export_hf(Decoder(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0)), tmp_path / "smallw")
    shutil.copy(tmp_path / "smallw" / "model.safetensors", small / "model.safetensors")
    _one_line_error(*run(capsys, *["finetune", "--model", small, "--out", out], "--data", data)[:3:2],
                    "vocab")
    # scores on a fresh (untrained) adapter is refused
    from layerif_jax import LoraConfig, apply_lora
    from layerif_jax.peft_io import save_peft_adapter
    save_peft_adapter(apply_lora(load_model(tiny_dir), LoraConfig(rank=4)), tmp_path / "fresh")
    _one_line_error(*run(capsys, "scores", "--model", tiny_dir, "--lora", tmp_path / "fresh",
                         "--train", data, "--val", data, "--out", tmp_path / "sc")[:3:2],
                    "freshly initialised")
    # nothing half-written
    assert not out.exists() and not (tmp_path / "sc").exists() and not (tmp_path / "x").exists()


def test_run_full_pipeline(tiny_dir, data, tmp_path, capsys):
    """`layerif run --full`: fine-tune -> scores -> allocations + report -> MoE-LoRA and
    pruning, each evaluated. Checks the report against the allocation rules, not itself."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "run", "--model", tiny_dir,  # the embedded MRPC records
                       "--n-train", 16, "--n-val", 4, "--max-len", 32, "--lr", 1e-2, "--full",
                       "--n-eval", 6, "--n-calib", 4, "--calib-len", 16, "--ppl-tokens", 512,
                       "--out", out)
    assert code == 0, err
    alloc = json.loads((out / "report" / "allocation.json").read_text())
    assert (out / "report" / "allocation.png").stat().st_size > 1000
    for method, e in alloc["experts"].items():
        assert sum(e) == 10 and min(e) >= 1, method  # T = 5 per layer, 2 layers
        assert alloc["top_k"][method] == [2 if c > 1 else 1 for c in e]
    counts = np.tile([32 * 32, 32 * 16, 32 * 16, 32 * 32, 32 * 48, 32 * 48, 48 * 32], 2)
    for scheme, s in alloc["sparsity_per_matrix"].items():
        s = np.asarray(s)
        assert s.shape == (14,)
        assert abs((s * counts).sum() / counts.sum() - 0.5) < 1e-9, scheme
    summary = json.loads((out / "run.json").read_text())
    full = summary["full"]
    for method in ("layerif", "uniform"):
        assert 0.0 <= full["moe"][method]["accuracy"] <= 1.0
        assert np.isfinite(full["moe"][method]["final_train_loss"])
        assert abs(full["prune"][method]["global_sparsity"] - 0.5) < 0.01
        assert np.isfinite(full["prune"][method]["perplexity"])
    assert (out / "moe" / "layerif" / "adapter").is_dir()


def test_run_bad_sparsity(tiny_dir, data, tmp_path, capsys):
    code, _, err = run(capsys, "run", "--model", tiny_dir, "--train", data, "--val", data,
                       "--n-train", 4, "--n-val", 2, "--sparsity", 1.5, "--out", tmp_path / "r")
    assert code == 2 and err.startswith("error:") and "sparsity" in err
