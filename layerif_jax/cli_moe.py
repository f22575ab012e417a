"""`layerif moe train|eval`: LoRA-MoE with per-layer expert counts (METHOD.md section 4).

Wired into the main parser with `cli_moe.register(sub)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli_common import positive_float as _pos_float, positive_int as _pos_int
from .errors import LayerIFError


def read_allocation(path, num_layers: int, top_k=None):
    """(experts, top_k) from an allocation JSON ('layerif allocate experts --out': key
    'experts', optional 'total' and 'top_k') or a plain JSON list. Wrong layer count,
    sum != total, counts < 1, or top-k > a layer's experts -> LayerIFError."""
    from .io import read_json
    from .moe import check_experts, resolve_top_k

    obj = read_json(path)
    saved_k = None
    if isinstance(obj, dict):
        if "experts" not in obj:
            raise LayerIFError(f"{path}: no 'experts' key (expected `layerif allocate experts` output)")
        experts, total, saved_k = obj["experts"], obj.get("total"), obj.get("top_k")
    elif isinstance(obj, list):
        experts, total = obj, None
    else:
        raise LayerIFError(f"{path}: expected a JSON object with 'experts' or a JSON list")
    if not isinstance(experts, list):
        raise LayerIFError(f"{path}: 'experts' must be a list of integers")
    counts = check_experts(experts, num_layers)
    if total is not None and sum(counts) != int(total):
        raise LayerIFError(f"{path}: expert counts sum to {sum(counts)} but 'total' is {total}")
    ks = resolve_top_k(counts, top_k if top_k is not None else saved_k)
    return counts, ks


def cmd_moe_train(a):
    from flax import nnx

    from .cli import _examples, _load_model_and_tokenizer
    from .moe import MoELoraModel, train_moe
    from .train import TrainConfig

    model, tok, path = _load_model_and_tokenizer(a.model, a.dtype)
    experts, ks = read_allocation(a.experts, model.cfg.num_layers, a.top_k)
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                      warmup_steps=a.warmup, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      max_len=a.max_len, seed=a.seed,
                      compute_dtype="bfloat16" if a.bf16 else "float32")
    train = _examples(tok, a.data, a.limit, a.max_len, a.mask_prompt)
    val = _examples(tok, a.val, a.val_limit, a.max_len, a.mask_prompt) if a.val else None
    moe = MoELoraModel(model, experts, rank=a.rank, alpha=a.alpha, targets=a.targets, top_k=ks,
                       rngs=nnx.Rngs(a.seed))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hist = train_moe(moe, train, a.out, cfg, val_examples=val, aux_coef=a.aux_coef,
                     progress=not getattr(a, "quiet", False), pad_id=pad, base_model_name=path)
    last = hist["epochs"][-1] if hist.get("epochs") else {}
    print(f"trained LoRA-MoE (experts {' '.join(map(str, experts))}) on {a.data}: "
          f"{json.dumps(last)}")
    print(f"adapter: {Path(a.out) / 'adapter'}")


def cmd_moe_eval(a):
    from .cli import _load_model_and_tokenizer
    from .io import write_json
    from .moe import accuracy, load_moe_adapter

    model, tok, _ = _load_model_and_tokenizer(a.model, a.dtype)
    if a.adapter:
        model = load_moe_adapter(model, a.adapter, top_k=a.top_k)
    res = accuracy(model, tok, a.data, a.limit, a.mode, batch_size=a.batch_size,
                   max_new_tokens=a.max_new_tokens, max_len=a.max_len)
    print(f"{res['task']}: accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}, "
          f"mode {res['mode']}, unparsed {res['unparsed']})")
    if a.out:
        write_json(a.out, res)
        print(f"results -> {a.out}")


def register(subparsers) -> None:
    """Add `moe train` and `moe eval` to the main parser's subparsers."""
    s = subparsers.add_parser("moe", help="LoRA-MoE with per-layer expert counts: train, eval")
    msub = s.add_subparsers(dest="moe_cmd", required=True, metavar="ACTION")

    t = msub.add_parser("train", help="train MoE-LoRA experts and routers (resumes from OUT)")
    t.add_argument("--model", required=True, help="HF dir, .gguf or converted checkpoint")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--data", required=True, help="JSON/JSONL task file")
    t.add_argument("--experts", required=True,
                   help="allocation JSON from `layerif allocate experts --out` (key 'experts')")
    t.add_argument("--out", required=True, help="output dir: adapter/ and checkpoints/")
    t.add_argument("--val", help="validation JSON/JSONL file")
    t.add_argument("--epochs", type=_pos_int, default=3)
    t.add_argument("--lr", type=_pos_float, default=3e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--batch-size", type=_pos_int, default=8)
    t.add_argument("--grad-accum", type=_pos_int, default=1)
    t.add_argument("--max-len", type=_pos_int, default=256)
    t.add_argument("--limit", type=_pos_int, help="first N training records")
    t.add_argument("--val-limit", type=_pos_int)
    t.add_argument("--rank", type=_pos_int, default=8)
    t.add_argument("--alpha", type=_pos_float, default=16.0)
    t.add_argument("--targets", default="q,k,v,o,gate,up,down")
    t.add_argument("--top-k", type=_pos_int,
                   help="experts per token in every layer (default: the file's top_k, else "
                        "2 where a layer has > 1 expert)")
    t.add_argument("--aux-coef", type=float, default=0.0,
                   help="Switch load-balancing loss coefficient (0 = off; paper option 0.001)")
    t.add_argument("--mask-prompt", action="store_true")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_moe_train)

    e = msub.add_parser("eval", help="accuracy by greedy generation (or log-likelihood)")
    e.add_argument("--model", required=True)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--adapter", help="MoE adapter dir (or a `moe train` output dir); "
                                     "omit to evaluate the base model")
    e.add_argument("--data", required=True, help="task file (qa_*, glue_*)")
    e.add_argument("--limit", type=_pos_int)
    e.add_argument("--mode", default="generate", choices=["generate", "loglik"])
    e.add_argument("--top-k", type=_pos_int)
    e.add_argument("--batch-size", type=_pos_int, default=8)
    e.add_argument("--max-new-tokens", type=_pos_int, default=16)
    e.add_argument("--max-len", type=_pos_int, default=256)
    e.add_argument("--out", help="write results JSON")
    e.set_defaults(fn=cmd_moe_eval)
