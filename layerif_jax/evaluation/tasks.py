"""Task accuracy of a model (a MoE-LoRA model or a plain decoder): greedy generation
and answer extraction, or the most likely answer (the one scorer of `loglik`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data import Example, load_records, pack, record_text
from ..errors import LayerIFError
from ..stop import check as check_stop
from .loglik import row_logprob

GLUE_LABELS = {"cola": ("acceptable", "unacceptable"), "mrpc": ("equivalent", "not equivalent"),
               "rte": ("entailment", "not entailment")}
_LETTER_RE = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([A-Z])\b")
_ANSWER_RE = re.compile(r"(?i:answer)\s*:\s*\(?([A-Z])\b")


def _task_kind(task: str) -> str:
    t = Path(str(task)).name.lower()
    if t.startswith("qa") or "qa_" in t:
        return "qa"
    for g in GLUE_LABELS:
        if g in t:
            return g
    return "labels"


def extract_answer(text: str, task: str, labels: Sequence[str] | None = None) -> str | None:
    """The answer in generated `text`, or None.

    QA tasks (name starting "qa", e.g. qa_openbook_test_all.json; records end "Answer: The
    answer is X."): the letter after "the answer is" (else after "Answer:"), upper-cased.
    GLUE tasks (cola / mrpc / rte, records end "Answer: <label>."): the label after
    "Answer:" (else the first label anywhere), longest label first so "not equivalent" is
    not read as "equivalent". `labels` overrides the label set.
    """
    kind = _task_kind(task)
    if kind == "qa" and not labels:
        m = _LETTER_RE.search(text) or _ANSWER_RE.search(text)
        return m.group(1) if m else None
    labs = list(labels) if labels else list(GLUE_LABELS.get(kind, ()))
    if not labs:
        raise LayerIFError(f"no answer labels known for task {task!r}; pass labels")
    alt = "|".join(re.escape(x) for x in sorted(labs, key=len, reverse=True))
    low = {x.lower(): x for x in labs}
    m = re.search(rf"answer\s*:\s*({alt})\b", text, re.IGNORECASE)
    if m is None:
        m = re.search(rf"(?<![A-Za-z])({alt})\b", text, re.IGNORECASE)
    return low[m.group(1).lower()] if m else None


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if len(ids) > 1 and eos is not None and ids[-1] == eos:  # tokenizers that append EOS
        ids = ids[:-1]
    return ids


def _next_tokens_impl(graphdef, state, ids, mask, pos):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask)
    return jnp.argmax(logits[jnp.arange(ids.shape[0]), pos], axis=-1).astype(jnp.int32)


_next_tokens = jax.jit(_next_tokens_impl, static_argnames=("graphdef",))


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
             batch_size: int = 8, pad_id: int | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped). Full recompute per new token
    over a fixed padded shape [batch_size, bucket(prompt + max_new_tokens)], right padding
    (causal attention: padding after a row's end never affects it); stops at EOS."""
    if max_new_tokens < 1:
        raise LayerIFError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graphdef, state = nnx.split(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = pad_id if pad_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        check_stop()
        chunk = [_prompt_ids(tokenizer, p) for p in prompts[s:s + batch_size]]
        n = len(chunk)
        longest = max(len(c) for c in chunk) + max_new_tokens
        T = -(-longest // 16) * 16
        ids = np.full((batch_size, T), pad, np.int32)
        mask = np.zeros((batch_size, T), bool)
        cur = np.ones(batch_size, np.int64)
        for r, c in enumerate(chunk):
            ids[r, :len(c)], mask[r, :len(c)], cur[r] = c, True, len(c)
        done = np.zeros(batch_size, bool)
        done[n:] = True
        new = [[] for _ in range(n)]
        for _ in range(max_new_tokens):
            tok = np.asarray(_next_tokens(graphdef, state, ids, mask, (cur - 1).astype(np.int32)))
            for r in range(n):
                if done[r]:
                    continue
                t = int(tok[r])
                if t in eos_set:
                    done[r] = True
                    continue
                new[r].append(t)
                ids[r, cur[r]], mask[r, cur[r]] = t, True
                cur[r] += 1
            if done.all():
                break
        out.extend(tokenizer.decode(x, skip_special_tokens=True) for x in new)
    return out


def generate_answer(model, tokenizer, prompt: str, *, max_new_tokens: int = 16) -> str:
    """Greedy continuation of one prompt."""
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1)[0]


def _gold(rec: dict, task: str) -> str:
    if "answer" in rec and rec["answer"] is not None:
        return str(rec["answer"]).strip()
    got = extract_answer(str(rec.get("output", "")), task)
    if got is None:
        raise LayerIFError(f"{task}: a record has neither 'answer' nor a parsable 'output'")
    return got


def _candidates(rec: dict, kind: str, labels: Sequence[str]) -> list[str]:
    if kind == "qa":
        ch = rec.get("choices")
        if isinstance(ch, dict) and "label" in ch:
            return [str(x) for x in ch["label"]]
        if isinstance(ch, list):
            return [chr(ord("A") + i) for i in range(len(ch))]
        return list("ABCDE")
    return list(labels)


def accuracy(model, tokenizer, task_path: str | Path, limit: int | None = None,
             mode: str = "generate", *, batch_size: int = 8, max_new_tokens: int = 16,
             max_len: int = 256) -> dict[str, Any]:
    """Accuracy of `model` (MoELoraModel or plain Decoder) on a task file.

    Prompt = the record's instruction (+ input), as in training (`data.record_text`).
    mode "generate": greedy generation, then `extract_answer`; "loglik": the candidate
    whose full output (the record's `output` with its answer replaced by the candidate)
    has the highest summed log-probability given the prompt. Gold = the record's `answer`.
    """
    if mode not in ("generate", "loglik"):
        raise LayerIFError(f"mode must be 'generate' or 'loglik', got {mode!r}")
    task = Path(task_path).name
    kind = _task_kind(task)
    recs = load_records(task_path, limit)
    prompts = [record_text(r, index=i, source=str(task_path))[0] for i, r in enumerate(recs)]
    gold = [_gold(r, task) for r in recs]
    labels = (sorted(set(GLUE_LABELS.get(kind, ())) | set(gold)) if kind != "qa" else None)
    preds: list[str | None]
    if mode == "generate":
        texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
        preds = [extract_answer(t, task, labels) for t in texts]
    else:
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        items, owner = [], []
        for i, r in enumerate(recs):
            outp = str(r.get("output", ""))
            at = outp.rfind(gold[i])
            tmpl = (outp[:at] + "{}" + outp[at + len(gold[i]):]) if at >= 0 else "Answer: {}."
            n_prompt = len(_prompt_ids(tokenizer, prompts[i]))
            for cand in _candidates(r, kind, labels):
                ids = np.asarray(tokenizer(prompts[i] + " " + tmpl.format(cand))["input_ids"],
                                 np.int32)[:max_len]
                tg = np.arange(len(ids)) >= n_prompt
                items.append(Example(ids, tg))
                owner.append((i, cand))
        scores = np.empty(len(items))
        L = -(-max(len(e.ids) for e in items) // 16) * 16
        for s in range(0, len(items), batch_size):
            check_stop()
            idx = list(range(s, min(s + batch_size, len(items))))
            b = pack(items, idx, batch_size, L, pad)
            lp = np.asarray(row_logprob(model, jnp.asarray(b.ids), jnp.asarray(b.mask),
                                        jnp.asarray(b.targets))[0])
            scores[idx] = lp[:len(idx)]
        best: dict[int, tuple[float, str]] = {}
        for (i, cand), sc in zip(owner, scores):
            if i not in best or sc > best[i][0]:
                best[i] = (sc, cand)
        preds = [best[i][1] if i in best else None for i in range(len(recs))]
    correct = [p is not None and p.strip().lower() == g.lower() for p, g in zip(preds, gold)]
    return {"task": task, "mode": mode, "n": len(recs), "correct": int(sum(correct)),
            "accuracy": float(np.mean(correct)) if correct else 0.0,
            "unparsed": int(sum(p is None for p in preds)),
            "predictions": preds, "gold": gold}
