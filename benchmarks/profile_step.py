"""Where the time of a LayerIF run goes on this CPU: every XLA operation executed during
one `layer_scores` call (jax.profiler's trace), attributed to the library function whose
code made it (the source frames XLA keeps in the optimized HLO) and to its kind (GEMM,
elementwise, reduction, layout, ...).

    python benchmarks/profile_step.py --n 32 --m 4              # SmolLM2, DataInf
    python benchmarks/profile_step.py --n 64 --m 8 --out prof.json

The run is made once to compile, then once more under the profiler. XLA dumps its
optimized programs (XLA_FLAGS --xla_dump_to, set here before jax is imported) so that
each traced operation (the trace names its module and HLO op) finds its source frames
and opcode. A control-flow op (while, conditional, call) is not counted itself: its
body's operations are. Times are the operations' own durations on the CPU client's
threads; "other" is the wall time of the call not inside any operation (Python, host
transfers, dispatch).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# generic helpers: an operation made in one of these is attributed to its caller
GENERIC = {"mm", "<lambda>", "<listcomp>", "<genexpr>", "<dictcomp>", "fold_lora", "_folded_cat",
           "astype", "reshape", "split", "concatenate"}
# library function -> the part of the step it belongs to
PARTS = {
    "attention": "attention", "softmax_last": "attention", "_softmax_fwd": "attention",
    "_softmax_bwd": "attention", "layer_biases": "attention", "attention_bias": "attention",
    "attention_masks": "attention", "apply_rope": "attention (rope)",
    "rope_inv_freq": "attention (rope)", "segment_attention": "attention",
    "glu": "MLP", "mlp": "MLP",
    "_probed_fwd": "linear maps", "probed_linears": "linear maps",
    "probe_group_fn.<locals>.fn": "linear maps", "fn": "linear maps",
    "_probed_bwd": "linear maps (backward)",
    "segment_outer": "per-example gradient sums", "lora_grads": "per-example gradient sums",
    "_outer": "per-example gradient sums", "lora_scores": "per-example scores",
    "_score_sums": "per-example scores", "_factor_sums": "K-FAC factor sums",
    "rms_norm": "norms", "layer_norm": "norms",
    "Decoder.head": "head + loss", "Decoder.next_token_nll": "head + loss",
    "_chunk_loss": "head + loss", "packed_loss": "head + loss",
    "Decoder.embed": "embedding", "to_slots": "gradient layout",
    "Decoder.hidden_states": "layer scan (weight slices, saved activations)",
    "_flat": "gradient norms and dots", "build_fn": "gradient norms and dots",
}
# an op's JAX name (op_name) -> the part, where its source frame is not specific enough
# (the backward of a custom_vjp keeps the frame of the primal's call site)
OP_NAMES = [("rjtk,rtn->rjkn", "per-example gradient sums"),
            ("segment_outer", "per-example gradient sums"),
            ("rti,ik->rtk", "per-example gradient sums"),
            ("rto,ko->rtk", "per-example gradient sums")]


def xla_dump_dir() -> str:
    """Set before jax is imported: XLA writes every optimized program here as text."""
    d = tempfile.mkdtemp(prefix="layerif_profile_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={d} "
                               "--xla_dump_hlo_as_text").strip()
    return d


def parse_module(text: str) -> dict[str, dict]:
    """{op name: {"opcode", "kind", "frames": [(file, function, line), ...] innermost
    first}} of one optimized HLO module's text (its FileNames / FunctionNames /
    FileLocations / StackFrames tables and its instructions)."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    ops = {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section, tables[line] = line, {}
            continue
        if section and re.match(r"^\d+ ", line):
            k, v = line.split(" ", 1)
            tables[section][int(k)] = v
            continue
        section = None
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(", line)
        if not m:
            continue
        kind = re.search(r"kind=(k\w+)", line)
        cfg = re.search(r'"kind":"(__\w+)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        name = re.search(r'op_name="([^"]*)"', line)
        ops[m.group(1)] = {"opcode": m.group(2), "op_name": name.group(1) if name else "",
                           "kind": (cfg.group(1) if cfg else kind.group(1) if kind else ""),
                           "frame": int(frame.group(1)) if frame else None}
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs, frames = {}, {}
    for k, v in tables.get("FileLocations", {}).items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files.get(int(f["file_name_id"]), "?"), funcs.get(int(f["function_name_id"]), "?"),
                   int(f["line"]))
    for k, v in tables.get("StackFrames", {}).items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
    for op in ops.values():
        chain, fid, seen = [], op.pop("frame"), set()
        while fid and fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            chain.append(locs.get(loc, ("?", "?", 0)))
            fid = parent
        op["frames"] = chain
    return ops


def op_kind(op: dict) -> str:
    code, kind = op["opcode"], op["kind"]
    if code in ("dot", "convolution") or kind in ("__ynn_fusion", "__onednn_fusion"):
        return "GEMM"
    if code == "custom-call":
        return "custom call"
    if code == "fusion":
        return {"kLoop": "elementwise", "kInput": "reduction", "kOutput": "GEMM",
                "kCustom": "GEMM"}.get(kind, kind or "fusion")
    if code in ("copy", "transpose", "bitcast", "concatenate", "slice", "dynamic-slice",
                "dynamic-update-slice", "pad", "broadcast", "reshape", "gather", "scatter"):
        return "layout"
    if code in ("reduce", "reduce-window", "sort"):
        return "reduction"
    return code


LIBRARY = ("layerif_jax", "/kernels/")


def attribute(op: dict, roots: tuple[str, ...] = LIBRARY) -> tuple[str, str]:
    """(part of the step, "function (file:line)") of an op: the innermost frame in the
    library or the kernels (files whose path holds one of `roots`) that is not a generic
    helper."""
    for pattern, part in OP_NAMES:
        if pattern in op.get("op_name", ""):
            return part, pattern
    for file, func, line in op["frames"]:
        if any(r in file for r in roots) and func.split(".<locals>")[0] not in GENERIC \
                and func.rsplit(".", 1)[-1] not in GENERIC:
            short = func.split(".<locals>")[0]
            part = PARTS.get(func, PARTS.get(short, PARTS.get(short.rsplit(".", 1)[-1], short)))
            where = f"{short} ({Path(file).parent.name}/{Path(file).name}:{line})"
            return part, where
    return "other (no library frame)", "-"


CONTROL = {"while", "conditional", "call", "async-start", "async-done"}


def profile_events(trace_dir: str) -> list[dict]:
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    d = json.load(gzip.open(sorted(paths)[-1]))
    ev = d["traceEvents"] if isinstance(d, dict) else d
    return [e for e in ev if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def breakdown(events: list[dict], modules: dict[str, dict[str, dict]],
              roots: tuple[str, ...] = LIBRARY) -> dict:
    """Seconds by part, by (part, kind), by (part, direction) and by function, from the
    traced ops."""
    by_part, by_kind, by_where, by_dir = (collections.Counter() for _ in range(4))
    unknown = 0.0
    for e in events:
        mod, name = e["args"].get("hlo_module", ""), e["args"]["hlo_op"]
        op = modules.get(mod, {}).get(name)
        secs = (e.get("dur") or 0) / 1e6
        if op is None:
            unknown += secs
            continue
        if op["opcode"] in CONTROL:
            continue
        part, where = attribute(op, roots)
        by_part[part] += secs
        by_kind[(part, op_kind(op))] += secs
        by_where[where] += secs
        by_dir[(part, "backward" if "transpose(" in op["op_name"] else "forward")] += secs
    return {"by_part": by_part, "by_kind": by_kind, "by_where": by_where, "by_dir": by_dir,
            "unattributed_s": unknown}


def load_modules(dump_dir: str) -> dict[str, dict[str, dict]]:
    """{module name: ops} of every optimized program in the dump (a module name met
    twice, e.g. two compiles of jit_local_fn: the ops of both, later ones winning)."""
    out: dict[str, dict] = {}
    for p in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        text = Path(p).read_text()
        m = re.match(r"HloModule (\S+?),", text)
        if m:
            out.setdefault(m.group(1), {}).update(parse_module(text))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--estimator", default="datainf")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    dump = xla_dump_dir()
    import jax

    import layerif_jax as lj
    from layerif_jax.bench.lm import smollm2_mrpc

    model, _, train, val = smollm2_mrpc(a.n, a.m)
    kw = dict(engine="packed", chunk_size=a.chunk_size, estimator=a.estimator)
    t0 = time.perf_counter()
    lj.layer_scores(model, train, val, **kw)                   # compiles
    cold = time.perf_counter() - t0
    trace = tempfile.mkdtemp(prefix="layerif_profile_trace_")
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        t0 = time.perf_counter()
        lj.layer_scores(model, train, val, **kw)
        wall = time.perf_counter() - t0
    res = breakdown(profile_events(trace), load_modules(dump))
    ops = sum(res["by_part"].values())
    print(f"SmolLM2-135M, {a.n} x {a.m}, {a.estimator}, chunk {a.chunk_size}: call {wall:.2f} s "
          f"(first, with compiles: {cold:.2f} s); XLA operations {ops:.2f} op-seconds (summed "
          f"over the CPU client's threads: independent ops overlap)")
    print(f"\n{'part of the step':<46} {'op-s':>6} {'share':>6} {'bwd':>6}   by kind")
    for part, s in res["by_part"].most_common():
        if s < 0.001 * ops:
            continue
        kinds = ", ".join(f"{k} {v:.2f}" for (p, k), v in res["by_kind"].most_common() if p == part)
        print(f"{part:<46} {s:6.2f} {s / ops:6.1%} {res['by_dir'][(part, 'backward')] / s:6.0%}   "
              f"{kinds}")
    print(f"\ntop {a.top} functions (innermost library frame)")
    for where, s in res["by_where"].most_common(a.top):
        print(f"  {s:8.2f} s {s / ops:6.1%}  {where}")
    out = {"n": a.n, "m": a.m, "estimator": a.estimator, "chunk_size": a.chunk_size,
           "wall_s": wall, "cold_s": cold, "ops_s": ops, "by_part": dict(res["by_part"]),
           "by_kind": {f"{p} / {k}": v for (p, k), v in res["by_kind"].items()},
           "by_where": dict(res["by_where"]), "unattributed_s": res["unattributed_s"],
           "backward_s": {p: v for (p, d), v in res["by_dir"].items() if d == "backward"}}
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
