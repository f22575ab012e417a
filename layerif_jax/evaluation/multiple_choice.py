"""Zero-shot multiple-choice accuracy by the log-likelihood of each candidate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ..data import encode_text
from ..errors import LayerIFError
from ..stop import check as check_stop
from .loglik import check_ids, progress_bar, row_logprob

STYLES = ("text", "letter")


_LABELS_RE = re.compile(r"Tell me if the (?:statements?|sentences?) (.+?)\.?\s*$")


def _glue_labels(instruction: str) -> list[str] | None:
    first = instruction.strip().splitlines()[0] if instruction.strip() else ""
    m = _LABELS_RE.match(first.strip())
    if not m:
        return None
    labels = [x.strip() for x in m.group(1).split(",") if x.strip()]
    return labels if len(labels) >= 2 else None


def _fill(output: str, gold: str, other: str, *, last: bool) -> str:
    """`output` with the gold label (its first, or last, occurrence) replaced by `other`."""
    i = output.rfind(gold) if last else output.find(gold)
    if i < 0:
        return other
    return output[:i] + other + output[i + len(gold):]


def mc_item(rec: dict[str, Any], *, index: int = 0, style: str = "text",
            labels: Sequence[str] | None = None, source: str = "task") -> tuple[str, list[str], int]:
    """(prompt, candidate continuations, index of the gold candidate) for one record."""
    if style not in STYLES:
        raise LayerIFError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    where = f"{source}: record {index}"
    if "choices" in rec:
        ch = rec["choices"]
        if isinstance(ch, dict) and "text" in ch:
            texts = [str(t) for t in ch["text"]]
            labs = [str(x) for x in ch.get("label", [])] or [chr(65 + i) for i in range(len(texts))]
        elif isinstance(ch, list):
            texts = [str(t) for t in ch]
            labs = [chr(65 + i) for i in range(len(texts))]
        else:
            raise LayerIFError(f"{where}: 'choices' must be a list or {{'text', 'label'}}")
        if len(texts) < 2 or len(labs) != len(texts):
            raise LayerIFError(f"{where}: needs at least two choices with one label each")
        gold_lab = rec.get("answerKey", rec.get("answer"))
        if gold_lab is None or str(gold_lab).strip() not in labs:
            raise LayerIFError(f"{where}: answer {gold_lab!r} is not one of the labels {labs}")
        gold = labs.index(str(gold_lab).strip())
        if style == "text":
            q = rec.get("question", rec.get("question_stem"))
            if q is None:
                raise LayerIFError(f"{where}: no 'question' or 'question_stem' for style 'text'")
            return f"Question: {str(q).strip()}\nAnswer:", [" " + t for t in texts], gold
        if "instruction" not in rec:
            raise LayerIFError(f"{where}: no 'instruction' for style 'letter'")
        prompt = str(rec["instruction"]) + (" " + str(rec["input"]) if rec.get("input") else "")
        out = str(rec.get("output") or "Answer: The answer is {}.".format(labs[gold]))
        return prompt, [" " + _fill(out, labs[gold], lab, last=True) for lab in labs], gold
    if "instruction" in rec and "answer" in rec:
        labs = list(labels) if labels else _glue_labels(str(rec["instruction"]))
        if not labs:
            raise LayerIFError(f"{where}: cannot read the label words from the instruction")
        ans = str(rec["answer"]).strip()
        if ans not in labs:
            raise LayerIFError(f"{where}: answer {ans!r} is not one of the labels {labs}")
        prompt = str(rec["instruction"]) + (" " + str(rec["input"]) if rec.get("input") else "")
        out = str(rec.get("output") or f"Answer: {ans}.")
        # "Answer: not entailment." - replace the gold label, not a word inside another label
        return prompt, [" " + _fill(out, ans, lab, last=False) for lab in labs], labs.index(ans)
    raise LayerIFError(f"{where}: not a multiple-choice record (needs 'choices' and "
                       f"'answerKey'/'answer', or 'instruction' and 'answer')")


def mc_accuracy(model, tokenizer, task_path, limit: int | None = None, *, style: str = "text",
                batch_size: int = 8, max_len: int | None = None, progress: bool = True,
                details: bool = False) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy by candidate log-likelihood.

    Returns {"accuracy", "accuracy_norm", "n", "task", "style"}; with `details`
    also "scores" (per record, the sum log p of each candidate) and "gold".
    Sequences longer than `max_len` (default: the model's context) lose the start of
    their prompt.
    """
    from ..data import load_records
    if batch_size < 1:
        raise LayerIFError(f"batch size must be >= 1, got {batch_size}")
    recs = load_records(task_path, limit)
    src = str(task_path)
    file_labels = None
    if recs and "choices" not in recs[0] and _glue_labels(str(recs[0].get("instruction", ""))) is None:
        file_labels = sorted({str(r.get("answer", "")).strip() for r in recs} - {""})
    max_len = int(max_len or model.cfg.max_position_embeddings)
    seqs: list[tuple[int, int, list[int], int]] = []  # record, candidate, ids, n_cand_tokens
    items = []
    for i, rec in enumerate(recs):
        prompt, cands, gold = mc_item(rec, index=i, style=style, labels=file_labels, source=src)
        items.append((cands, gold))
        p_ids = encode_text(tokenizer, prompt)
        for j, c in enumerate(cands):
            c_ids = encode_text(tokenizer, c, add_special_tokens=False)
            if not c_ids:
                raise LayerIFError(f"{src}: record {i}: candidate {c!r} has no tokens")
            if len(c_ids) >= max_len:
                raise LayerIFError(f"{src}: record {i}: candidate longer than max_len {max_len}")
            ids = (p_ids + c_ids)[-max_len:]
            if len(ids) == len(c_ids):  # need one context token to predict the first
                raise LayerIFError(f"{src}: record {i}: empty prompt")
            seqs.append((i, j, ids, len(c_ids)))
    all_ids = np.concatenate([np.asarray(s[2]) for s in seqs])
    check_ids(all_ids, model.cfg, src)

    scores = [np.full(len(c), -np.inf) for c, _ in items]
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
    bar = progress_bar(-(-len(order) // batch_size), f"mc {Path(src).name}", progress)
    for s in range(0, len(order), batch_size):
        check_stop()
        chunk = [seqs[k] for k in order[s:s + batch_size]]
        longest = max(len(c[2]) for c in chunk)
        T = min(max(16, -(-longest // 16) * 16), max(max_len, longest))
        ids = np.zeros((batch_size, T), np.int32)
        mask = np.zeros((batch_size, T), bool)
        tg = np.zeros((batch_size, T), bool)
        for r, (_, _, x, nc) in enumerate(chunk):
            ids[r, :len(x)] = x
            mask[r, :len(x)] = True
            tg[r, len(x) - nc:len(x)] = True
        lp, _ = row_logprob(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tg))
        lp = np.asarray(lp, np.float64)
        for r, (i, j, _, _) in enumerate(chunk):
            scores[i][j] = lp[r]
        bar.update(1)
    bar.close()
    correct = correct_norm = 0
    for (cands, gold), sc in zip(items, scores):
        lens = np.array([max(len(c), 1) for c in cands], np.float64)
        correct += int(np.argmax(sc) == gold)
        correct_norm += int(np.argmax(sc / lens) == gold)
    n = len(items)
    out: dict[str, Any] = {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n,
                           "task": src, "style": style}
    if details:
        out["scores"] = [sc.tolist() for sc in scores]
        out["gold"] = [g for _, g in items]
    return out
