"""Calibration tokens: windows of a raw text or of a task file's records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...data import encode_text
from ...errors import LayerIFError

__all__ = ["calibration_text", "calibration_ids"]


def calibration_text(path) -> str:
    """A raw text file as is, or a task JSON/JSONL file: its records' texts joined."""
    from ...data import load_records, read_text, record_text
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        recs = load_records(path)
        return "\n\n".join(record_text(r, index=i, source=str(path))[1]
                           for i, r in enumerate(recs))
    return read_text(path)


def calibration_ids(tokenizer, path, n_seq: int = 128, seq_len: int = 256,
                    seed: int = 0) -> np.ndarray:
    """`n_seq` random windows of `seq_len` tokens from the joined, tokenised text.

    The text of a raw file is tokenised whole; a task file (.json / .jsonl) gives
    its records' texts (`data.record_text`) joined by blank lines. Windows start
    uniformly at random (numpy Generator seeded by `seed`) and may overlap.
    """
    if n_seq < 1 or seq_len < 2:
        raise LayerIFError(f"need n_seq >= 1 and seq_len >= 2, got {n_seq} and {seq_len}")
    ids = np.asarray(encode_text(tokenizer, calibration_text(path)), np.int32)
    if ids.size < seq_len:
        raise LayerIFError(f"{path}: {ids.size} tokens, shorter than one calibration "
                           f"window of {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seq_len + 1, size=n_seq)
    return np.stack([ids[s:s + seq_len] for s in starts])
