"""The `layerif` command. Every user error prints one line and exits with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_common import (add_model, load_model_and_tokenizer, positive_float, positive_int,
                         read_scores)
from .errors import LayerIFError

ASSETS = Path(__file__).parent / "assets"


# -- helpers ---------------------------------------------------------------------------
def _examples(tok, path, limit, max_len, mask_prompt=False, what="data"):
    from .data import load_records, tokenize
    return tokenize(tok, load_records(path, limit), max_len=max_len, mask_prompt=mask_prompt,
                    source=str(path))


# -- subcommands -----------------------------------------------------------------------
def cmd_convert(a):
    from .model.checkpoints import convert
    out = convert(a.src, a.out, a.dtype, overwrite=a.overwrite)
    print(f"converted {a.src} -> {out}")


def cmd_export(a):
    from .model.checkpoints import export_hf, load_model
    from .model.tokenizer import load_tokenizer
    model = load_model(a.ckpt, a.dtype)
    if a.lora:
        from .peft_io import load_adapter
        load_adapter(model, a.lora)
    try:
        tok = load_tokenizer(a.ckpt)
    except LayerIFError:
        tok = None
    out = export_hf(model, a.out, merge_lora=not a.no_merge, tokenizer=tok, overwrite=a.overwrite)
    print(f"exported {a.ckpt} -> {out}")


def _train_config(a):
    from .train import TrainConfig
    return TrainConfig(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay,
                       warmup_steps=a.warmup, batch_size=a.batch_size, grad_accum=a.grad_accum,
                       max_len=a.max_len, seed=a.seed,
                       compute_dtype="bfloat16" if a.bf16 else "float32")


def _finetune(model, tok, a, model_path, out):
    from .model.lora import LoraConfig, apply_lora
    from flax import nnx
    from .train import finetune

    lcfg = LoraConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets)
    cfg = _train_config(a)
    train = _examples(tok, a.data, a.limit, a.max_len, a.mask_prompt)
    val = _examples(tok, a.val, a.val_limit, a.max_len, a.mask_prompt) if a.val else None
    apply_lora(model, lcfg, rngs=nnx.Rngs(a.seed))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return finetune(model, train, out, cfg, val_examples=val, progress=not a.quiet,
                    pad_id=pad, base_model_name=model_path)


def cmd_finetune(a):
    model, tok, path = load_model_and_tokenizer(a.model, a.dtype)
    hist = _finetune(model, tok, a, path, a.out)
    last = hist.get("epochs", [{}])[-1] if hist.get("epochs") else {}
    print(f"fine-tuned LoRA on {a.data}: {json.dumps(last)}")
    print(f"adapter: {Path(a.out) / 'adapter'}")


def _scores(model, tok, a, model_path, out, lora_path):
    import jax.numpy as jnp
    from .influence import layer_scores
    from .io import OutputDir, write_json, write_npy

    train = _examples(tok, a.train, a.n_train, a.max_len, a.mask_prompt)
    val = _examples(tok, a.val, a.n_val, a.max_len, a.mask_prompt)
    res = layer_scores(model, train, val, estimator=a.estimator, aggregate=a.aggregate,
                       unit=a.unit, damping=a.damping, per_val=a.per_val,
                       chunk_size=a.chunk_size, chunks_per_call=a.chunks_per_call,
                       memory_budget=a.memory_budget,
                       dtype=jnp.bfloat16 if a.bf16 else None, progress=not a.quiet,
                       skip_zero_units=a.skip_zero_units)
    summary = {
        "layer_scores": res.layer_scores, "aggregate": res.aggregate,
        "layer_scores_by_aggregate": {k: res.aggregated(k) for k in ("+ve", "top25", "all")},
        "estimator": res.estimator, "unit": res.unit, "n_train": res.n_train,
        "n_val": res.n_val, "seconds": round(res.seconds, 3), "model": model_path,
        "adapter": str(lora_path), "train": str(a.train), "val": str(a.val),
        "max_len": a.max_len, "gradients_kept": res.gradients_kept, **res.meta,
    }
    with OutputDir(out, "scores") as od, od.staging() as tmp:
        write_json(tmp / "scores.json", summary)
        write_npy(tmp / "per_example.npy", res.per_example)
        if a.per_val:
            write_npy(tmp / "per_val.npy", res.per_val)
            write_npy(tmp / "per_val_layers.npy", res.per_val_layers)
        plot_scores(res.layer_scores, tmp / "scores.png",
                    title=f"LayerIF ({res.estimator}, {res.aggregate}) — {Path(str(a.train)).name}")
    return res


def plot_scores(scores, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(scores)), scores, color="tab:blue")
    ax.set_xlabel("layer (decoder block)")
    ax.set_ylabel("S (higher = less well trained)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_scores(a):
    from .peft_io import load_adapter
    model, tok, path = load_model_and_tokenizer(a.model, a.dtype)
    load_adapter(model, a.lora)
    res = _scores(model, tok, a, path, a.out, a.lora)
    print(f"layer scores ({res.estimator}, {res.aggregate}) for {res.n_train} x {res.n_val} "
          f"examples in {res.seconds:.1f} s -> {Path(a.out) / 'scores.json'}")


def cmd_allocate_experts(a):
    from . import allocate
    from .io import write_json
    import numpy as np
    if a.method in ("layerif", "alphalora") and not a.scores:
        raise LayerIFError(f"--method {a.method} needs --scores")
    if a.method == "layerif":
        counts = allocate.expert_counts(read_scores(a.scores, a.aggregate), a.total, a.beta)
    elif a.method == "alphalora":
        counts = allocate.alphalora_experts(read_scores(a.scores, a.aggregate), a.total, a.beta,
                                            per_block=a.per_block)
    elif a.method == "uniform":
        counts = allocate.uniform_experts(a.layers or len(read_scores(a.scores, a.aggregate)), a.total)
    else:
        L = a.layers or len(read_scores(a.scores, a.aggregate))
        counts = allocate.mola_experts(L, a.total, a.method.split(":", 1)[1])
    counts = np.asarray(counts)
    out = {"method": a.method, "total": a.total, "beta": a.beta, "experts": counts,
           "top_k": allocate.top_k_per_layer(counts), "scores": a.scores}
    print(" ".join(str(int(c)) for c in counts))
    if a.out:
        write_json(a.out, out)
        print(f"allocation -> {a.out}")


def cmd_allocate_sparsity(a):
    from . import allocate
    from .io import write_json
    from .model.config import ModelConfig
    if a.config:
        cfg = ModelConfig.from_file(a.config)
    else:
        from .model.checkpoints import gguf_config, load_model
        cfg = gguf_config(a.model) if str(a.model).endswith(".gguf") else load_model(a.model).cfg
    counts = cfg.param_counts()
    kw = dict(param_counts=counts, target=a.sparsity, epsilon=a.epsilon, smooth=not a.no_smooth)
    if a.allocation in ("layerif", "reversed"):
        if not a.scores:
            raise LayerIFError(f"--allocation {a.allocation} needs --scores")
        kw["layer_scores"] = read_scores(a.scores, a.aggregate)
    elif a.allocation == "alphapruning":
        if not a.scores:
            raise LayerIFError("--allocation alphapruning needs --scores (PL_Alpha_Hill per matrix)")
        kw["alpha"] = read_scores(a.scores, a.aggregate)
    elif a.allocation == "owl":
        if not a.scores:
            raise LayerIFError("--allocation owl needs --scores (outlier ratio per block)")
        kw["outlier_ratios"] = read_scores(a.scores, a.aggregate)
    ratios = allocate.layer_sparsities(a.allocation, **kw)
    per_block = ratios.reshape(cfg.num_layers, -1)
    print(" ".join(f"{x:.4f}" for x in per_block.mean(1)))
    if a.out:
        write_json(a.out, {"allocation": a.allocation, "target": a.sparsity,
                           "epsilon": a.epsilon, "per_matrix": ratios,
                           "per_block_mean": per_block.mean(1)})
        print(f"sparsities -> {a.out}")


# -- parser ----------------------------------------------------------------------------
def command_defaults(command: str, **given) -> argparse.Namespace:
    """The settings `layerif COMMAND` has when given only `given`: for a command that runs
    another command's code (`layerif run`), so that the parser stays the one source of
    every default."""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    ns = {a.dest: a.default for a in subs.choices[command]._actions if a.dest != "help"}
    unknown = set(given) - set(ns) - {"quiet"}
    if unknown:
        raise TypeError(f"`layerif {command}` has no settings {sorted(unknown)}")
    return argparse.Namespace(**{**ns, "quiet": False, **given})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerif", description=(
        "LayerIF in JAX: layer-wise influence scores for LLMs, and their use for LoRA-MoE "
        "expert allocation and pruning sparsity."))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("convert", help="HF dir or GGUF -> the project's checkpoint (orbax)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("export", help="a checkpoint -> Hugging Face safetensors dir")
    s.add_argument("ckpt")
    s.add_argument("out")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--lora", help="adapter to include (PEFT dir or finetune output dir)")
    s.add_argument("--no-merge", action="store_true",
                   help="write the adapter to OUT/adapter instead of merging it")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("finetune", help="LoRA fine-tuning with AdamW (resumes from DIR)")
    add_model(s, required=True)
    s.add_argument("--data", required=True, help="JSON/JSONL task file")
    s.add_argument("--out", required=True, help="output dir: adapter/ and checkpoints/")
    s.add_argument("--val", help="validation JSON/JSONL file")
    s.add_argument("--epochs", type=positive_int, default=1)
    s.add_argument("--lr", type=positive_float, default=3e-4)
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--warmup", type=int, default=100, help="warm-up steps (then linear decay)")
    s.add_argument("--rank", type=positive_int, default=8)
    s.add_argument("--alpha", type=positive_float, default=16.0)
    s.add_argument("--dropout", type=float, default=0.0)
    s.add_argument("--targets", default="q,k,v,o,gate,up,down",
                   help="comma-separated modules (q,k,v,o,gate,up,down or q_proj,...)")
    s.add_argument("--max-len", type=positive_int, default=128)
    s.add_argument("--batch-size", type=positive_int, default=8)
    s.add_argument("--grad-accum", type=positive_int, default=1)
    s.add_argument("--limit", type=positive_int, help="first N training records")
    s.add_argument("--val-limit", type=positive_int, help="first N validation records")
    s.add_argument("--mask-prompt", action="store_true", help="only output tokens count in the loss")
    s.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 master weights)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("scores", help="per-layer influence and LayerIF layer scores")
    add_model(s, required=True)
    s.add_argument("--lora", required=True, help="PEFT adapter dir or `layerif finetune` output dir")
    s.add_argument("--train", required=True)
    s.add_argument("--val", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n-train", type=positive_int, default=300, help="first n training records")
    s.add_argument("--n-val", type=positive_int, default=50, help="first m validation records")
    s.add_argument("--estimator", default="datainf", choices=["datainf", "identity", "exact"])
    s.add_argument("--aggregate", default="+ve", choices=["+ve", "top25", "all"])
    s.add_argument("--unit", default="tensor", choices=["tensor", "module", "block"])
    s.add_argument("--damping", type=positive_float, help="fixed lambda (default: adaptive per unit)")
    s.add_argument("--per-val", action="store_true", help="also write n x m (and n x m x L) scores")
    s.add_argument("--max-len", type=positive_int, default=128)
    s.add_argument("--mask-prompt", action="store_true")
    s.add_argument("--chunk-size", type=positive_int, default=8)
    s.add_argument("--chunks-per-call", type=positive_int, default=4,
                   help="chunks of --chunk-size examples run by one compiled call")
    s.add_argument("--memory-budget", default="8GB",
                   help="keep per-example gradients up to this size (bytes, e.g. 8GB); "
                        "recompute the rest")
    s.add_argument("--bf16", action="store_true", help="bfloat16 forward/backward, float32 sums")
    s.add_argument("--skip-zero-units", action="store_true")
    s.set_defaults(fn=cmd_scores)

    s = sub.add_parser("allocate", help="experts per layer or sparsity per matrix from scores")
    asub = s.add_subparsers(dest="what", required=True, metavar="WHAT")
    e = asub.add_parser("experts", help="LoRA-MoE experts per layer (METHOD.md section 4)")
    e.add_argument("--scores", help="scores.json, a .npy or a JSON list")
    e.add_argument("--total", type=positive_int, required=True, help="T, experts in total")
    e.add_argument("--beta", type=float, default=2.5)
    e.add_argument("--aggregate", default="+ve", choices=["+ve", "top25", "all"],
                   help="which aggregate to read from a scores.json")
    e.add_argument("--method", default="layerif",
                   choices=["layerif", "uniform", "alphalora", "mola:2-4-6-8", "mola:8-6-4-2",
                            "mola:5-5-5-5", "mola:8-2-2-8"])
    e.add_argument("--layers", type=positive_int, help="number of layers (uniform/MoLA without scores)")
    e.add_argument("--per-block", type=positive_int, default=7,
                   help="alphalora: values per block in --scores (7 per matrix, 1 per block)")
    e.add_argument("--out", help="write the allocation as JSON")
    e.set_defaults(fn=cmd_allocate_experts)
    r = asub.add_parser("sparsity", help="per-matrix pruning sparsities (METHOD.md section 5)")
    r.add_argument("--scores", help="scores.json / .npy (per block or per matrix)")
    r.add_argument("--model", help="model whose matrix sizes weigh the sparsities")
    r.add_argument("--config", help="or just its config.json")
    r.add_argument("--sparsity", type=float, required=True, help="global target in (0, 1)")
    r.add_argument("--epsilon", type=float, default=0.1)
    r.add_argument("--allocation", default="layerif",
                   choices=["layerif", "reversed", "uniform", "alphapruning", "owl"])
    r.add_argument("--aggregate", default="+ve", choices=["+ve", "top25", "all"])
    r.add_argument("--no-smooth", action="store_true")
    r.add_argument("--out")
    r.set_defaults(fn=cmd_allocate_sparsity)

    from .cli_run import register as register_run
    register_run(sub, ASSETS)

    from .cli_moe import register as register_moe
    from .cli_prune import register as register_prune
    register_prune(sub)
    register_moe(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if getattr(a, "cmd", None) == "allocate" and a.what == "sparsity" and not (a.model or a.config):
        parser.error("allocate sparsity needs --model or --config (matrix sizes)")
    try:
        a.fn(a)
    except LayerIFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (finetune resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
