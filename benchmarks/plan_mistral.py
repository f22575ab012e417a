"""Ahead-of-time plans of all-layer DataInf on a Mistral-7B shape for TPU slices and NVIDIA
GPUs, from this CPU (`layerif_jax.influence.plan`; the libtpu wheel: `pip install -e
".[plan]"`; the JAX CUDA plugin: `pip install -e ".[plan-gpu]"`).

transformers' default MistralConfig (the Mistral-7B-v0.1 shapes), bfloat16 weights,
LoRA r 8 on all 7 maps of the 32 blocks, 128-token examples; one compilation per
topology and chunk size, accounted for every n x m of --sizes. Prints the plans, then
the JSON object of each. Compiler estimates, not measurements.

    python benchmarks/plan_mistral.py --topology v5e:2x4 --chunk-size 8 --sizes 300x50,3000x500
    python benchmarks/plan_mistral.py --topology v5e:2x4 --chunk-size 128 --sharding fsdp --remat mlp
    python benchmarks/plan_mistral.py --topology h200 --chunk-size 16
    python benchmarks/plan_mistral.py --topology v5e:2x4 --chunk-size 128 --sharding fsdp \
        --remat mlp --sizes 3000x500 --memory-budget 80530MB
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--sizes", default="300x50,3000x500")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kernels", choices=("auto", "reference"), default="auto")
    ap.add_argument("--sharding", choices=("dp", "fsdp", "fsdp_tp"), default="dp")
    ap.add_argument("--mesh", default=None, help="DATAxMODEL (default: all chips on data)")
    ap.add_argument("--remat", choices=("full", "mlp"), default=None,
                    help="blocks recomputed in the backward: full, or the MLP half only")
    ap.add_argument("--memory-budget", default=None,
                    help="bytes for kept gradients over all devices (e.g. 80530MB); the "
                         "plan then also compiles the score pass of the recomputed calls")
    ap.add_argument("--no-advice", action="store_true",
                    help="do not re-plan smaller chunks when the plan does not fit")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from transformers import AutoConfig

    from layerif_jax.influence.plan import plans
    from layerif_jax.io import dumps
    from layerif_jax.models.config import ModelConfig
    from layerif_jax.models.lora import LoraConfig

    cfg = ModelConfig.from_hf(AutoConfig.for_model("mistral").to_dict())
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    out = plans(cfg, LoraConfig(rank=8, alpha=16.0), topology_spec=args.topology, sizes=sizes,
                tokens=args.tokens, chunk_size=args.chunk_size, model_name="Mistral-7B shape",
                kernels=args.kernels, sharding=args.sharding, mesh_shape=args.mesh,
                advise=not args.no_advice, remat=args.remat, memory_budget=args.memory_budget)
    for p in out:
        print("\n".join(p.lines()))
    for p in out:
        print(dumps({"wall_s": round(time.perf_counter() - t0, 1), **p.to_json()}))


if __name__ == "__main__":
    main()
