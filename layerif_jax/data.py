"""Task data: records -> token ids with a loss mask -> length-bucketed, padded batches.

Text of a record (METHOD.md section 1): `instruction + " " + output` (a non-empty
`input` goes between them, joined by a space), or a plain text field. Each example
is tokenised alone and truncated; padding never counts in the loss.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import LayerIFError
from .notes import note


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray        # int32 [T]
    targets: np.ndarray    # bool [T]: token t is predicted (from t-1) and counts in the loss


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: np.ndarray        # int32 [B, T]
    mask: np.ndarray       # bool  [B, T] attention mask (real tokens)
    targets: np.ndarray    # bool  [B, T]
    index: np.ndarray      # int32 [B] position of each row in the example list, -1 = filler row


def load_records(path: str | Path, limit: int | None = None, *,
                 what: str = "records") -> list[dict[str, Any]]:
    """A JSON list of objects, or JSONL (one object per line). `limit` keeps the first N
    (a note says so when the file holds fewer)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise LayerIFError(f"--limit must be >= 1, got {limit}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LayerIFError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise LayerIFError(f"{path} is a directory, not a data file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LayerIFError(f"cannot read data file {path}: {e}") from None
    stripped = text.lstrip()
    records: Any = None
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayerIFError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    elif stripped.startswith("{"):
        try:  # one (pretty-printed) JSON object is not a list of records
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL, parsed below
        if isinstance(whole, dict):
            keys = ", ".join(list(map(str, whole))[:5])
            raise LayerIFError(f"{path}: expected a list of records (a JSON list of objects or "
                               f"JSONL, one object per line), got one JSON object (keys: {keys})")
    if records is None:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LayerIFError(f"{path}: malformed JSONL at line {n}: {e.msg}") from None
            if not isinstance(records[-1], dict):
                raise LayerIFError(f"{path}: line {n} is not a JSON object")
            if limit is not None and len(records) >= limit:
                break
    if not isinstance(records, list):
        raise LayerIFError(f"{path}: expected a list of records, got {type(records).__name__}")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise LayerIFError(f"{path}: record {bad} is a {type(records[bad]).__name__}, "
                           "not a JSON object")
    if not records:
        raise LayerIFError(f"{path}: empty dataset")
    if limit is not None and len(records) < limit:
        note(f"asked for {limit} {what} but {path} holds {len(records)}; using {len(records)}")
    return records[:limit] if limit is not None else records


def _field(rec: dict[str, Any], key: str, index: int, source: str, *,
           optional: bool = False) -> str:
    if key not in rec:
        if optional:
            return ""
        raise LayerIFError(f"{source}: record {index} has no field '{key}'")
    v = rec[key]
    if not isinstance(v, str):
        kind = "null" if v is None else f"of type {type(v).__name__}"
        raise LayerIFError(f"{source}: record {index} field '{key}' is {kind}, expected a string")
    return v


def record_text(rec: dict[str, Any], *, index: int = 0, text_field: str | None = None,
                source: str = "data") -> tuple[str, str]:
    """(prompt, full text). The prompt is what `mask_prompt` excludes from the loss.

    Records with `instruction` or `output` need both as strings (`input`, if present,
    too); otherwise the text field (default `text`) must be a string. Null, non-string
    and missing fields are errors naming the record and the field.
    """
    if text_field is None and ("instruction" in rec or "output" in rec):
        prompt = _field(rec, "instruction", index, source)
        extra = _field(rec, "input", index, source, optional=True)
        if extra:
            prompt = prompt + " " + extra
        return prompt, prompt + " " + _field(rec, "output", index, source)
    field = text_field or "text"
    if field not in rec:
        want = f"'{text_field}'" if text_field else "'instruction' and 'output', or 'text'"
        raise LayerIFError(f"{source}: record {index} lacks the text fields ({want})")
    return "", _field(rec, field, index, source)


def tokenize(tokenizer, records: Sequence[dict[str, Any]], *, max_len: int = 128,
             mask_prompt: bool = False, text_field: str | None = None,
             source: str = "data", numbers: Sequence[int] | None = None) -> list[Example]:
    """Tokenise each record alone (the tokenizer's default special tokens), truncate to
    max_len. Notes say how many records were truncated (and by how much) and how many
    have an empty output under `mask_prompt`. numbers: each record's number in its file
    (for messages; default: its position)."""
    if max_len < 2:
        raise LayerIFError(f"--max-len must be >= 2, got {max_len}")
    out, cut, empty = [], [], 0
    for i, rec in zip(range(len(records)) if numbers is None else numbers, records):
        prompt, text = record_text(rec, index=i, text_field=text_field, source=source)
        full = np.asarray(tokenizer(text)["input_ids"], np.int32)
        if len(full) > max_len:
            cut.append(len(full) - max_len)
        ids = full[:max_len]
        targets = np.arange(len(ids)) >= 1
        if mask_prompt and prompt:
            if not text[len(prompt):].strip():
                empty += 1
            n_prompt = len(tokenizer(prompt)["input_ids"])
            targets &= np.arange(len(ids)) >= n_prompt
        if not targets.any():
            raise LayerIFError(f"{source}: record {i} has no token that counts in the loss "
                               f"(length {len(ids)} after truncation to {max_len})")
        out.append(Example(ids, targets))
    if not out:
        raise LayerIFError(f"{source}: empty dataset")
    if cut:
        note(f"{source}: {len(cut)} of {len(out)} records truncated to --max-len {max_len} "
             f"(by {min(cut)} to {max(cut)} tokens, {sum(cut)} in all)")
    if empty:
        note(f"{source}: {empty} record(s) have an empty output; with --mask-prompt only the "
             "separator after the prompt counts in their loss")
    return out


def bucket_length(n: int, multiple: int, max_len: int) -> int:
    """Pad lengths to a multiple (few distinct shapes = few compilations)."""
    return min(max(multiple, -(-n // multiple) * multiple), max(max_len, n))


def pack(examples: Sequence[Example], index: Sequence[int], batch_size: int, length: int,
         pad_id: int = 0) -> Batch:
    """Right-pad `index` examples into a [batch_size, length] batch; missing rows are fillers."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    targets = np.zeros((batch_size, length), bool)
    idx = np.full((batch_size,), -1, np.int32)
    for row, i in enumerate(index):
        ex = examples[i]
        t = len(ex.ids)
        ids[row, :t], mask[row, :t], targets[row, :t], idx[row] = ex.ids, True, ex.targets, i
    return Batch(ids, mask, targets, idx)


def bucketed_batches(examples: Sequence[Example], batch_size: int, *, multiple: int = 16,
                     max_len: int | None = None, pad_id: int = 0) -> Iterator[Batch]:
    """Examples sorted by length, cut into fixed-size batches, each padded to its own bucket.

    Every batch has exactly `batch_size` rows (the last is filled with masked filler
    rows), so the number of distinct shapes is the number of buckets, not of batches.
    Order inside the result is recorded in `Batch.index`.
    """
    if batch_size < 1:
        raise LayerIFError(f"batch size must be >= 1, got {batch_size}")
    lengths = np.array([len(e.ids) for e in examples])
    max_len = int(max_len or lengths.max())
    order = np.argsort(lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        yield pack(examples, chunk, batch_size,
                   bucket_length(int(lengths[chunk].max()), multiple, max_len), pad_id)


def epoch_batches(examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int,
                  max_len: int, pad_id: int = 0, shuffle: bool = True) -> list[Batch]:
    """Training batches for one epoch: a seeded shuffle, each batch padded to max_len."""
    order = np.arange(len(examples))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    return [pack(examples, order[s:s + batch_size], batch_size, max_len, pad_id)
            for s in range(0, len(order), batch_size)]


def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a whole text (no truncation warnings)."""
    try:
        out = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
    except TypeError:
        out = tokenizer(text, add_special_tokens=add_special_tokens)
    return list(out["input_ids"])


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LayerIFError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LayerIFError(f"cannot read {path}: {e}") from None
