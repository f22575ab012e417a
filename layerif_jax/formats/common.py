"""Helpers every checkpoint format shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..io import OutputDir
from ..models.lora import lora_config_of


def oneline(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0][:200] if msg else type(e).__name__


def output_dir(out_dir, command: str, overwrite: bool) -> OutputDir:
    """`out_dir` as an `io.OutputDir` (an open one is used as it is): files of others in
    it are refused unless `overwrite`, and are never removed."""
    if isinstance(out_dir, OutputDir):
        return out_dir
    return OutputDir(Path(out_dir).expanduser().resolve(), command, overwrite=overwrite)


def lora_info(model) -> dict[str, Any] | None:
    """The LoRA section of a model (rank, alpha, dropout, targets, dtype), or None."""
    lins = {n: lin for n, lin in model.layers.linears().items() if lin.lora_a is not None}
    if not lins:
        return None
    first = next(iter(lins.values()))
    rank = int(first.lora_a.shape[-1])
    info = {"rank": rank, "alpha": float(first.lora_scale) * rank,
            "dropout": float(first.lora_dropout), "targets": list(lins),
            "dtype": str(jnp.dtype(first.lora_a[...].dtype))}
    lc = lora_config_of(model)
    if lc is not None and lc.rank == rank and set(lc.targets) == set(lins):
        info.update(alpha=float(lc.alpha), dropout=float(lc.dropout))  # the exact config
    return info
