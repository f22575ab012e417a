"""layerif_jax.data: records -> token ids with a loss mask -> padded batches, against
token ids and masks worked out by hand on a word-level tokenizer (word w{i} is id i + 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import word_tokenizer
from layerif_jax.data import (
    Example,
    bucket_length,
    bucketed_batches,
    epoch_batches,
    load_records,
    pack,
    record_text,
    tokenize,
)
from layerif_jax.errors import LayerIFError

RECS = [{"instruction": "w1 w2", "input": "", "output": "w3"},
        {"instruction": "w4", "input": "w5 w6", "output": "w7 w8"},
        {"text": "w9 w10 w11"}]


def write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------ records
def test_load_records_json_and_jsonl(tmp_path):
    as_list = write(tmp_path / "a.json", json.dumps(RECS, indent=2))
    as_lines = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in RECS) + "\n\n")
    assert load_records(as_list) == RECS == load_records(as_lines)
    assert load_records(as_list, limit=2) == RECS[:2] == load_records(as_lines, limit=2)


def test_load_records_limit_larger_than_file_is_noted(tmp_path, caplog):
    p = write(tmp_path / "a.json", json.dumps(RECS))
    assert load_records(p, limit=10) == RECS
    assert "asked for 10 records but" in caplog.text and "holds 3" in caplog.text


@pytest.mark.parametrize("text, match", [
    ('{"instruction": "w1",\n "output": "w2"}', "got one JSON object"),
    ('[{"a": 1}, 3]', "record 1 is a int"),
    ('[{"a": 1},', "malformed JSON at line 1"),
    ('{"a": 1}\n{"a": ', "malformed JSONL at line 2"),
    ('{"a": 1}\n[1]', "line 2 is not a JSON object"),
    ("[]", "empty dataset"),
    ('"text"', "line 1 is not a JSON object"),
])
def test_load_records_errors(tmp_path, text, match):
    with pytest.raises(LayerIFError, match=match):
        load_records(write(tmp_path / "bad.json", text))


def test_load_records_file_errors(tmp_path):
    with pytest.raises(LayerIFError, match="not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(LayerIFError, match="is a directory"):
        load_records(tmp_path)
    with pytest.raises(LayerIFError, match="--limit must be >= 1"):
        load_records(tmp_path / "x.json", limit=0)
    (tmp_path / "latin1.json").write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(LayerIFError, match="cannot read data file"):
        load_records(tmp_path / "latin1.json")


def test_record_text_follows_method():
    # METHOD.md section 1: instruction + " " + output, a non-empty input between them
    assert record_text(RECS[0]) == ("w1 w2", "w1 w2 w3")
    assert record_text(RECS[1]) == ("w4 w5 w6", "w4 w5 w6 w7 w8")
    assert record_text(RECS[2]) == ("", "w9 w10 w11")
    assert record_text({"body": "w1", "instruction": "x", "output": "y"},
                       text_field="body") == ("", "w1")


@pytest.mark.parametrize("rec, match", [
    ({"instruction": "w1", "output": None}, "record 4 field 'output' is null"),
    ({"instruction": "w1", "output": 3}, "field 'output' is of type int"),
    ({"instruction": "w1"}, "record 4 has no field 'output'"),
    ({"instruction": "w1", "input": ["w2"], "output": "w3"}, "field 'input' is of type list"),
    ({"prompt": "w1"}, "lacks the text fields"),
])
def test_record_text_bad_fields(rec, match):
    with pytest.raises(LayerIFError, match=match):
        record_text(rec, index=4, source="task.json")


# ------------------------------------------------------------------ tokenising
def test_tokenize_ids_and_targets_by_hand():
    tok = word_tokenizer(20)
    full = tokenize(tok, RECS, max_len=16)
    assert [e.ids.tolist() for e in full] == [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15]]
    # token 0 is never predicted; every other token counts
    assert [e.targets.tolist() for e in full] == [[False, True, True],
                                                  [False, True, True, True, True],
                                                  [False, True, True]]
    masked = tokenize(tok, RECS, max_len=16, mask_prompt=True)
    assert [e.ids.tolist() for e in masked] == [e.ids.tolist() for e in full]
    # the prompt's tokens are out of the loss; a text record has no prompt
    assert [e.targets.tolist() for e in masked] == [[False, False, True],
                                                    [False, False, False, True, True],
                                                    [False, True, True]]
    assert all(e.ids.dtype == np.int32 and e.targets.dtype == bool for e in masked)


def test_tokenize_truncates_and_notes(caplog):
    tok = word_tokenizer(20)
    out = tokenize(tok, RECS, max_len=3)
    assert [e.ids.tolist() for e in out] == [[5, 6, 7], [8, 9, 10], [13, 14, 15]]
    assert "1 of 3 records truncated to --max-len 3 (by 2 to 2 tokens, 2 in all)" in caplog.text
    with pytest.raises(LayerIFError, match="record 1 has no token that counts"):
        tokenize(tok, RECS, max_len=3, mask_prompt=True)  # its prompt fills all 3 tokens
    with pytest.raises(LayerIFError, match="--max-len must be >= 2"):
        tokenize(tok, RECS, max_len=1)
    with pytest.raises(LayerIFError, match="empty dataset"):
        tokenize(tok, [], max_len=8)


# ------------------------------------------------------------------ batches
def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(4, 20, n).astype(np.int32), np.arange(n) >= 1)
            for n in lengths]


def test_bucket_length():
    assert [bucket_length(n, 8, 64) for n in (1, 8, 9, 63, 64)] == [8, 8, 16, 64, 64]
    assert bucket_length(18, 16, 20) == 20      # capped at max_len
    assert bucket_length(30, 16, 10) == 30      # never shorter than the example


def test_pack_pads_right_and_marks_fillers():
    ex = _examples([3, 5])
    b = pack(ex, [1, 0], batch_size=3, length=6, pad_id=0)
    assert b.ids.shape == b.mask.shape == b.targets.shape == (3, 6)
    np.testing.assert_array_equal(b.ids[0, :5], ex[1].ids)
    np.testing.assert_array_equal(b.ids[1, :3], ex[0].ids)
    assert (b.ids[0, 5:] == 0).all() and (b.ids[1, 3:] == 0).all() and (b.ids[2] == 0).all()
    assert b.mask.sum(1).tolist() == [5, 3, 0]
    assert b.targets.sum(1).tolist() == [4, 2, 0]
    assert b.index.tolist() == [1, 0, -1]


def test_bucketed_batches_cover_every_example_once():
    lengths = [3, 17, 9, 4, 30, 12, 5]
    ex = _examples(lengths)
    batches = list(bucketed_batches(ex, 3, multiple=8))
    # sorted by length: (3, 4, 5) (9, 12, 17) (30); the last bucket is capped at the longest
    assert [b.ids.shape for b in batches] == [(3, 8), (3, 24), (3, 30)]
    seen = np.concatenate([b.index for b in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(len(ex)))
    for b in batches:
        for row, i in enumerate(b.index):
            if i >= 0:
                n = lengths[i]
                np.testing.assert_array_equal(b.ids[row, :n], ex[i].ids)
                assert b.mask[row].sum() == n and not b.targets[row, n:].any()
    with pytest.raises(LayerIFError, match="batch size must be >= 1"):
        list(bucketed_batches(ex, 0))


def test_epoch_batches_seeded_permutation():
    ex = _examples([4] * 10)
    order = lambda bs: np.concatenate([b.index for b in bs])  # noqa: E731
    e0 = epoch_batches(ex, 4, seed=3, epoch=0, max_len=8)
    assert [b.ids.shape for b in e0] == [(4, 8)] * 3
    o0 = order(e0)
    assert sorted(o0[o0 >= 0].tolist()) == list(range(10)) and (o0 < 0).sum() == 2
    np.testing.assert_array_equal(o0, order(epoch_batches(ex, 4, seed=3, epoch=0, max_len=8)))
    assert not np.array_equal(o0, order(epoch_batches(ex, 4, seed=3, epoch=1, max_len=8)))
    assert not np.array_equal(o0, order(epoch_batches(ex, 4, seed=4, epoch=0, max_len=8)))
    plain = order(epoch_batches(ex, 4, seed=3, epoch=0, max_len=8, shuffle=False))
    assert plain[:10].tolist() == list(range(10))
