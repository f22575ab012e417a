"""LoRA fine-tuning: schedule, accumulation, padding, frozen base, resume, bf16."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerif_jax.data import Example, epoch_batches, pack
from layerif_jax.errors import LayerIFError
from layerif_jax.models.config import LINEARS, ModelConfig
from layerif_jax.models.decoder import Decoder
from layerif_jax.models.lora import LoraConfig, apply_lora
from layerif_jax.models.params import model_from_tensors
from layerif_jax.training import (
    TrainConfig, batch_loss, finetune, lr_at, make_optimizer, make_schedule, split_model,
    train_loop, train_step)

VOCAB = 97
CFG = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)


def make_base(seed=0):
    """A random base (built from numpy: no eager JAX ops to compile) whose logits are not
    all ~0 (the default 0.02 init caps what any LoRA could learn)."""
    rng = np.random.default_rng(100 + seed)
    d = CFG.hidden_size
    sd = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, d)),
          "model.norm.weight": np.ones(d),
          "lm_head.weight": 2 * rng.standard_normal((VOCAB, d)) / np.sqrt(d)}
    for l in range(CFG.num_layers):
        for name in LINEARS:
            d_in, d_out = CFG.linear_shape(name)
            sub = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            sd[f"model.layers.{l}.{sub}.{name}.weight"] = (
                rng.standard_normal((d_out, d_in)) / np.sqrt(d_in))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{l}.{norm}.weight"] = 1 + 0.1 * rng.standard_normal(d)
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    return model_from_tensors(CFG, sd.keys(), sd.__getitem__)


def make_model(rank=4, dropout=0.0, seed=0):
    return apply_lora(make_base(seed), LoraConfig(rank=rank, alpha=8, dropout=dropout),
                      rngs=nnx.Rngs(seed + 1))


# shared by the accumulation and memorisation tests: one compiled step for both
MEMO = TrainConfig(epochs=12, lr=1e-2, warmup_steps=0, batch_size=4, max_len=16,
                   checkpoint_every=1000)


def make_examples(n, seed=0, lo=5, hi=13):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(lo, hi))
        ids = rng.integers(1, VOCAB, t).astype(np.int32)
        out.append(Example(ids, np.arange(t) >= 1))
    return out


def lora_arrays(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def base_arrays(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]


def test_config_validation():
    for kw, msg in [({"lr": 0}, "learning rate"), ({"lr": -1e-3}, "learning rate"),
                    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                    ({"grad_accum": 0}, "grad_accum"), ({"warmup_steps": -1}, "warmup_steps"),
                    ({"compute_dtype": "float16"}, "compute dtype"), ({"keep": 0}, "keep"),
                    ({"checkpoint_every": 0}, "checkpoint_every"),
                    ({"max_grad_norm": -1.0}, "max_grad_norm"),
                    ({"weight_decay": -0.1}, "weight decay")]:
        with pytest.raises(LayerIFError, match=msg):
            TrainConfig(**kw)
    assert TrainConfig(compute_dtype="bf16").compute_dtype == "bfloat16"
    with pytest.raises(LayerIFError, match="no LoRA"):
        split_model(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))))


def test_schedule():
    s = make_schedule(TrainConfig(lr=1.0, warmup_steps=4), 10)
    # warm-up 0 -> 1 over 4 steps, then 1 -> 0 over the remaining 6
    for step, want in [(0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (5, 5 / 6), (7, 0.5), (10, 0.0)]:
        assert float(s(step)) == pytest.approx(want, abs=1e-6), step
    # warm-up longer than the run is clipped to it
    s = make_schedule(TrainConfig(lr=2.0, warmup_steps=100), 8)
    assert [float(s(k)) for k in (0, 4, 8)] == pytest.approx([0.0, 1.0, 2.0])
    # the logged (pure Python) learning rate is the same function
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    s = make_schedule(cfg, 10)
    for step in range(12):
        assert lr_at(cfg, 10, step) == pytest.approx(float(s(step)), abs=1e-6), step
    # no warm-up: pure linear decay
    s = make_schedule(TrainConfig(lr=3.0, warmup_steps=0), 6)
    assert [float(s(k)) for k in (0, 2, 6)] == pytest.approx([3.0, 2.0, 0.0])
    # the optimizer uses the schedule: the first warm-up update is zero
    tx = make_optimizer(TrainConfig(lr=1.0, warmup_steps=4), 10)
    p = {"w": jnp.ones(3)}
    upd, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(upd["w"]), 0.0)


def _micro(b, cfg):
    A, B = cfg.grad_accum, cfg.batch_size
    return (b.ids.reshape(A, B, -1), b.mask.reshape(A, B, -1), b.targets.reshape(A, B, -1),
            b.index.reshape(A, B))


def _step_once(model, batch, cfg, total):
    from layerif_jax.training import opt_spec
    graphdef, lora, rest = split_model(model)
    opt = make_optimizer(cfg, total).init(lora)
    new, _, stats = train_step(lora, opt, rest, *_micro(batch, cfg), jax.random.key(0), 0,
                               graphdef=graphdef, opt_spec=opt_spec(cfg, total),
                               dtype=cfg.compute_dtype, dropout=False)
    return [np.asarray(x) for x in jax.tree.leaves(new)], stats


def _garbage(b, seed=0):
    """The same batch with random ids in every padded slot and filler rows flagged as targets."""
    rng = np.random.default_rng(seed)
    ids, tgt = b.ids.copy(), b.targets.copy()
    pad = ~b.mask
    ids[pad] = rng.integers(1, VOCAB, pad.sum())
    tgt[b.index < 0] = True
    return type(b)(ids, b.mask.copy(), tgt, b.index.copy())


def test_grad_accum_equals_big_batch():
    model = make_model()
    # B nonzero so that A has a gradient too
    for lin in model.layers.linears().values():
        lin.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(3), lin.lora_b.shape))
    ex = make_examples(3, seed=5)  # 3 examples: the 4-row batch has one filler row
    batch = epoch_batches(ex, 4, seed=0, epoch=0, max_len=16)[0]
    total = 24
    acc = dataclasses.replace(MEMO, batch_size=2, grad_accum=2)
    a, sa = _step_once(model, batch, acc, total)
    b, sb = _step_once(model, batch, MEMO, total)
    assert int(sa["rows"]) == int(sb["rows"]) == 3
    assert float(sa["loss"]) == pytest.approx(float(sb["loss"]), rel=1e-6)
    assert float(sa["grad_norm"]) == pytest.approx(float(sb["grad_norm"]), rel=1e-5)
    # Adam's first update is ~ lr * g / (|g| + eps): entries with |g| near eps amplify
    # summation-order noise, so the parameter tolerance is a small fraction of lr
    tol = dict(rtol=1e-4, atol=1e-2 * MEMO.lr)
    for x, y, z in zip(a, b, lora_arrays(model)):
        assert np.abs(x - z).max() > 0.5 * MEMO.lr  # something happened
        np.testing.assert_allclose(x, y, **tol)
    # garbage in padded slots and filler rows changes neither loss nor update
    c, sc = _step_once(model, _garbage(batch), MEMO, total)
    assert float(sc["loss"]) == pytest.approx(float(sb["loss"]), rel=1e-6)
    for x, y in zip(c, b):
        np.testing.assert_allclose(x, y, **tol)


def test_padding_never_counts():
    model = make_model()
    for lin in model.layers.linears().values():
        lin.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(4), lin.lora_b.shape))
    ex = make_examples(3, seed=2)
    tight = pack(ex, [0, 1, 2], 3, 13)
    loose = _garbage(pack(ex, [2, 0, 1], 6, 32))  # 3 filler rows, 19 more padding columns
    # one example per batch (same shape as `tight`: no extra compile), then averaged
    want = np.mean([batch_loss(model, pack(ex, [i], 3, 13)) for i in range(3)])
    assert batch_loss(model, tight) == pytest.approx(want, rel=1e-5)
    assert batch_loss(model, loose) == pytest.approx(want, rel=1e-5)


def test_memorise_loss_decreases_base_frozen(tmp_path):
    model = make_model()
    base0, lora0 = base_arrays(model), lora_arrays(model)
    ex = make_examples(8, seed=1)
    cfg = MEMO
    hist = finetune(model, ex, tmp_path / "run", cfg, val_examples=ex[:4], progress=False)
    assert hist["completed"] and hist["step"] == 24 == len(hist["train_loss"])
    first, last = hist["epochs"][0], hist["epochs"][-1]
    assert last["train_loss"] < 0.5 * first["train_loss"], (first, last)
    assert last["val_loss"] < 0.5 * first["val_loss"]
    assert hist["lr"][0] == pytest.approx(1e-2) and hist["lr"][12] == pytest.approx(5e-3)
    # base untouched, LoRA changed (and kept float32)
    for x, y in zip(base_arrays(model), base0):
        np.testing.assert_array_equal(x, y)
    assert all(not np.allclose(x, y) for x, y in zip(lora_arrays(model), lora0))
    assert all(x.dtype == np.float32 for x in lora_arrays(model))
    run = tmp_path / "run"
    state = json.loads((run / "train_state.json").read_text())
    assert state["status"] == "complete" and state["step"] == 24
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "history.json").read_text())["step"] == 24
    assert len([p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]) == cfg.keep
    # the written adapter reproduces the trained model
    from layerif_jax.formats.peft import load_adapter
    other = load_adapter(make_base(), run)
    x = jnp.asarray(ex[0].ids[None])
    np.testing.assert_allclose(np.asarray(other(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_resume_matches_uninterrupted(tmp_path):
    # dropout on (keys must be reproduced too), 2 x accumulation, a partial last batch,
    # interruption in the middle of the second epoch
    cfg = TrainConfig(epochs=3, lr=1e-2, warmup_steps=2, batch_size=2, grad_accum=2, max_len=16,
                      checkpoint_every=2, keep=2, seed=3)
    ex = make_examples(10, seed=4)  # 3 steps per epoch, the third has 2 real rows of 4
    full = make_model(dropout=0.1)
    h_full = finetune(full, ex, tmp_path / "a", cfg, progress=False)
    assert h_full["total_steps"] == 9

    part = make_model(dropout=0.1)
    h1 = finetune(part, ex, tmp_path / "b", cfg, progress=False, max_steps=5)
    assert not h1["completed"] and h1["step"] == 5
    assert not (tmp_path / "b" / "adapter").exists()
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["status"] == "stopped"
    resumed = make_model(dropout=0.1)  # fresh LoRA: the checkpoint must override it
    h2 = finetune(resumed, ex, tmp_path / "b", cfg, progress=False)
    assert h2["completed"] and h2["resumed_from"] == 5
    for x, y in zip(lora_arrays(resumed), lora_arrays(full)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h2["train_loss"], h_full["train_loss"], rtol=1e-6)
    assert len(h2["epochs"]) == 3
    # a completed run called again does nothing more
    h3 = finetune(make_model(dropout=0.1), ex, tmp_path / "b", cfg, progress=False)
    assert h3["step"] == 9 and h3["train_loss"] == h2["train_loss"]
    # different settings refuse to resume
    with pytest.raises(LayerIFError, match="different run"):
        finetune(make_model(dropout=0.1), ex, tmp_path / "b",
                 TrainConfig(**{**cfg.__dict__, "lr": 5e-3}), progress=False)


def test_bf16_compute(tmp_path):
    model = make_model()
    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_steps=0, batch_size=4, max_len=16,
                      compute_dtype="bfloat16")
    hist = finetune(model, make_examples(6, seed=7), tmp_path / "r", cfg,
                    val_examples=make_examples(3, seed=8), progress=False)
    assert np.all(np.isfinite(hist["train_loss"])) and np.isfinite(hist["epochs"][-1]["val_loss"])
    assert all(x.dtype == np.float32 for x in lora_arrays(model))
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    # the bf16 loss is close to the float32 one
    ex = make_examples(3, seed=8)
    b = pack(ex, [0, 1, 2], 4, 16)  # the validation batch shape
    assert batch_loss(model, b, "bfloat16") == pytest.approx(batch_loss(model, b), rel=0.05)


def _fake_loop(tmp_path, monkeypatch, step_fn, n=12):
    """train_loop over 6 steps of a fake step function, with a recording progress bar."""
    events = []

    class Bar:
        def __init__(self, *a, **k):
            self.n = k.get("initial", 0)

        def update(self, k):
            self.n += k
            events.append(("bar", self.n))

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    import tqdm.auto
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    cfg = TrainConfig(epochs=1, lr=1e-2, warmup_steps=0, batch_size=2, max_len=16,
                      checkpoint_every=1000)
    params, opt = {"w": jnp.zeros(3)}, {"m": jnp.ones(3)}
    return events, lambda: train_loop(
        params, opt, lambda *a: step_fn(events, *a), cfg=cfg, train=make_examples(n),
        out_dir=tmp_path, fingerprint={"x": 1}, state_key="p",
        stats_keys={"train_loss": "loss"}, progress=True)


def test_loop_counts_finished_steps_and_runs_at_most_one_ahead(tmp_path, monkeypatch):
    class Lazy:  # a step result whose value is known only when it is read
        def __init__(self, events, k):
            self.events, self.k, self.read = events, k, False

        def __float__(self):
            if not self.read:
                self.events.append(("finished", self.k))
                self.read = True
            return 1.0

    def step(events, params, opt, ids, mask, tgt, idx, k):
        events.append(("dispatched", k))
        return params, opt, {"loss": Lazy(events, k)}

    events, go = _fake_loop(tmp_path, monkeypatch, step)
    res = go()
    assert res.step == 6 and res.history["completed"]
    finished = dispatched = 0
    for kind, k in events:
        if kind == "dispatched":
            dispatched += 1
            assert dispatched - finished <= 2, events  # one in flight beyond the awaited one
        elif kind == "finished":
            finished += 1
        else:
            assert k <= finished, events              # the bar never counts unfinished steps
    assert [e for e in events if e[0] == "bar"][-1] == ("bar", 6)


def test_diverged_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def step(events, params, opt, ids, mask, tgt, idx, k):
        loss = jnp.float32(np.nan if k == 3 else 1.0)
        return jax.tree.map(lambda x: x + 1, params), opt, {"loss": loss}

    events, go = _fake_loop(tmp_path, monkeypatch, step)
    with pytest.raises(LayerIFError, match="not finite at step 4 of 6"):
        go()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
