"""An independent float64 reference for layer-wise influence.

Per-example LoRA gradients come from the transformers torch model with peft, in
float64, one backward per example (the paper's code path); the estimators are
written out in NumPy from METHOD.md section 2, straight from the formulas (no
streaming, no partition machinery).
"""

from __future__ import annotations

import numpy as np
import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_torch_model(model_type="llama", seed=0, layers=3, noise=0.03, **kw):
    import transformers
    C = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
         "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig}[model_type]
    cfg = C(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, **kw)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * noise)
    return m, cfg


def random_lora(cfg_dims: dict[str, tuple[int, int]], layers: int, rank=4, seed=1, scale=0.1):
    """{module: (A [L, d_in, r], B [L, r, d_out])} float64."""
    rng = np.random.default_rng(seed)
    return {name: (rng.normal(0, scale, (layers, d_in, rank)), rng.normal(0, scale, (layers, rank, d_out)))
            for name, (d_in, d_out) in cfg_dims.items()}


def peft_model(torch_model, lora, rank, alpha):
    import peft
    conf = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(lora), lora_dropout=0.0)
    pm = peft.get_peft_model(torch_model, conf).double().eval()
    sd = {}
    for name, (A, B) in lora.items():
        sub = "self_attn" if name in MODULES[:4] else "mlp"
        for l in range(A.shape[0]):
            pre = f"base_model.model.model.layers.{l}.{sub}.{name}"
            sd[f"{pre}.lora_A.default.weight"] = torch.tensor(A[l].T)
            sd[f"{pre}.lora_B.default.weight"] = torch.tensor(B[l].T)
    missing = pm.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    return pm


def torch_per_example_grads(pm, examples, lora_names, layers):
    """{(module, 'A'|'B', layer): [n, size]} float64 gradients, A/B in OUR layout ([d_in, r], [r, d_out])."""
    out = {}
    params = dict(pm.named_parameters())
    for ex in examples:
        pm.zero_grad()
        ids = torch.tensor(ex.ids[None].astype(np.int64))
        labels = ids.clone()
        labels[0, ~torch.tensor(ex.targets)] = -100
        pm(input_ids=ids, labels=labels).loss.backward()
        for name in lora_names:
            sub = "self_attn" if name in MODULES[:4] else "mlp"
            for l in range(layers):
                pre = f"base_model.model.model.layers.{l}.{sub}.{name}"
                gA = params[f"{pre}.lora_A.default.weight"].grad.T.numpy().ravel().copy()
                gB = params[f"{pre}.lora_B.default.weight"].grad.T.numpy().ravel().copy()
                out.setdefault((name, "A", l), []).append(gA)
                out.setdefault((name, "B", l), []).append(gB)
    return {k: np.stack(v) for k, v in out.items()}


def reference_scores(train_g, val_g, layers, estimator="datainf", unit="tensor", damping=None):
    """Per-example per-layer scores [n, L] (and per-val [n, m, L]) in float64, from the formulas."""
    names = sorted({k[0] for k in train_g})
    n = next(iter(train_g.values())).shape[0]
    m = next(iter(val_g.values())).shape[0]
    per_val = np.zeros((n, m, layers))
    per_ex = np.zeros((n, layers))
    for l in range(layers):
        if unit == "tensor":
            units = [[(nm, ab)] for nm in names for ab in "AB"]
        elif unit == "module":
            units = [[(nm, "A"), (nm, "B")] for nm in names]
        else:
            units = [[(nm, ab) for nm in names for ab in "AB"]]
        for u in units:
            G = np.concatenate([train_g[(nm, ab, l)] for nm, ab in u], 1)   # [n, d]
            V = np.concatenate([val_g[(nm, ab, l)] for nm, ab in u], 1)     # [m, d]
            d = G.shape[1]
            lam = damping if damping else 0.1 * np.mean(np.sum(G * G, 1)) / d
            for j in range(m + 1):
                v = V[j] if j < m else V.mean(0)   # j == m: the mean validation gradient
                if estimator == "identity":
                    h = v
                elif estimator == "exact":
                    h = np.linalg.solve(G.T @ G / n + lam * np.eye(d), v)
                else:  # DataInf, literally: (1/(n lam)) sum_i (v - c_i g_i)
                    h = np.zeros(d)
                    for i in range(n):
                        c = v @ G[i] / (lam + G[i] @ G[i])
                        h += v - c * G[i]
                    h /= n * lam
                if j < m:
                    per_val[:, j, l] += G @ h
                else:
                    per_ex[:, l] += G @ h
    return per_ex, per_val
