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


def backward(pm, ex, nxt=None):
    """One example's backward of its mean loss over the target tokens (grads zeroed);
    nxt [T - 1]: the label of every position (default: the next id)."""
    pm.zero_grad()
    ids = torch.tensor(ex.ids[None].astype(np.int64))
    labels = ids.clone()
    if nxt is not None:   # transformers shifts: labels[t + 1] is position t's label
        labels[0, 1:] = torch.tensor(np.asarray(nxt, np.int64))
    labels[0, ~torch.tensor(ex.targets)] = -100
    pm(input_ids=ids, labels=labels).loss.backward()


def drawn_next_tokens(pm, examples, uniforms):
    """The true Fisher's labels by inverse CDF, in float64 from the torch model's own
    logits: position t of example i takes the first token whose cumulative probability
    exceeds uniforms(i, t) (the uniform draws are the library's, `draw_next_tokens`'s
    spec; everything else here is torch and NumPy)."""
    out = []
    for i, ex in enumerate(examples):
        with torch.no_grad():
            logits = pm(input_ids=torch.tensor(ex.ids[None].astype(np.int64))).logits[0].numpy()
        p = np.exp(logits - logits.max(-1, keepdims=True))
        c = np.cumsum(p / p.sum(-1, keepdims=True), -1)
        u = np.asarray([uniforms(i, t) for t in range(len(ex.ids) - 1)])
        out.append(np.array([np.searchsorted(c[t], u[t] * c[t, -1], side="right")
                             for t in range(len(u))]))
    return out


def torch_per_example_grads(pm, examples, lora_names, layers, labels=None):
    """{(module, 'A'|'B', layer): [n, size]} float64 gradients, A/B in OUR layout ([d_in, r],
    [r, d_out]); labels: per example the label of every position (default: the next id)."""
    out = {}
    params = dict(pm.named_parameters())
    for i, ex in enumerate(examples):
        backward(pm, ex, None if labels is None else labels[i])
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


def torch_kfac_factors(pm, examples, lora_names, layers, labels=None):
    """{(module, 'A'|'B', layer): (left, right)} float64 K-FAC factors from torch hooks on
    peft's LoRA modules, one backward per example: for A the mean over all tokens of
    x x^T (the input of lora_A) and (1/n) sum over tokens of du du^T (du: the gradient of
    lora_A's output); for B the same of u (lora_A's output) and of the gradient of lora_B's
    output (the scaling included, as peft multiplies after lora_B). labels: as in
    `torch_per_example_grads` (drawn ones: the true Fisher's factors)."""
    sums, hooks, tokens = {}, [], 0
    mods = dict(pm.named_modules())

    def record(key, which):
        def fwd(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            add(key, which, 0, x)
            out.register_hook(lambda g: add(key, which, 1, g.detach().reshape(-1, g.shape[-1])))
        return fwd

    def add(key, which, side, z):
        k = (key[0], which, key[1])
        acc = sums.setdefault(k, [0.0, 0.0])
        acc[side] = acc[side] + (z.T @ z).numpy()

    for name in lora_names:
        sub = "self_attn" if name in MODULES[:4] else "mlp"
        for l in range(layers):
            pre = f"base_model.model.model.layers.{l}.{sub}.{name}"
            hooks.append(mods[f"{pre}.lora_A.default"].register_forward_hook(record((name, l), "A")))
            hooks.append(mods[f"{pre}.lora_B.default"].register_forward_hook(record((name, l), "B")))
    try:
        for i, ex in enumerate(examples):
            backward(pm, ex, None if labels is None else labels[i])
            tokens += len(ex.ids)
    finally:
        for h in hooks:
            h.remove()
    n = len(examples)
    return {k: (v[0] / tokens, v[1] / n) for k, v in sums.items()}


def kfac_reference_scores(train_g, val_g, factors, layers, ekfac=False, fisher_g=None):
    """Per-example per-layer K-FAC / EK-FAC scores [n, L] (tensor units, adaptive damping
    0.1 mean ||g||^2 / d), written with explicit Kronecker matrices: G ~ kron(left, right)
    (K-FAC), or kron(Q_L, Q_R) diag(corrected) kron(Q_L, Q_R)^T with the corrected
    eigenvalues the diagonal of the empirical Fisher in that basis (EK-FAC), or of the
    Fisher of `fisher_g` (the gradients at drawn labels: the true Fisher)."""
    names = sorted({k[0] for k in train_g})
    n = next(iter(train_g.values())).shape[0]
    out = np.zeros((n, layers))
    for l in range(layers):
        for nm in names:
            for ab in "AB":
                G = train_g[(nm, ab, l)]
                v = val_g[(nm, ab, l)].mean(0)
                d = G.shape[1]
                lam = 0.1 * np.mean(np.sum(G * G, 1)) / d
                left, right = factors[(nm, ab, l)]
                if ekfac:
                    Q = np.kron(np.linalg.eigh(left)[1], np.linalg.eigh(right)[1])
                    F = G if fisher_g is None else fisher_g[(nm, ab, l)]
                    diag = np.einsum("ij,ik,kj->j", Q, F.T @ F / n, Q)
                    h = Q @ ((Q.T @ v) / (diag + lam))
                else:
                    h = np.linalg.solve(np.kron(left, right) + lam * np.eye(d), v)
                out[:, l] += G @ h
    return out
