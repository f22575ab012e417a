"""The model families: one folder each (models/<family>/), registered here.

A family says how to read and write its Hugging Face config (`from_hf`, `to_hf`: the
fields that differ from the common ones), which per-block norms it has (its checkpoint
key map follows from them, `params.hf_table`), a few constants (RMSNorm offset,
embedding scaling), and its block: `block(cfg, p, x, bias, pos, inv_freq, lins, dtype)`,
the attention + MLP of one decoder block, built from the shared layers
(`models.decoder`). The decoder around it (embedding, the scan over stacked blocks, the
head) is shared. Adding a family is one folder plus its line at the bottom of this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..errors import LayerIFError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]          # model_type -> the HF architecture class name
    block: Callable                        # one decoder block (see the module docstring)
    from_hf: Callable[[dict, str], dict[str, Any]]   # (HF config, model_type) -> fields
    to_hf: Callable[[Any], dict[str, Any]]           # ModelConfig -> HF config entries
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # [L, d]
    head_norms: tuple[str, ...] = ()       # per-head norms [L, head_dim], under self_attn
    norm_offset: float = 0.0               # RMSNorm multiplies by (offset + w)
    scale_embeddings: bool = False         # embeddings x sqrt(hidden size)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for t in family.model_types:
        FAMILIES[t] = family
    return family


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise LayerIFError(f"unsupported architecture {model_type!r} (supported: "
                           f"{', '.join(FAMILIES)})") from None


def supported() -> tuple[str, ...]:
    return tuple(FAMILIES)


from . import gemma, gemma2, llama, qwen3  # noqa: E402,F401  (each registers itself)
