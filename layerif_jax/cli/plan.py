"""`layerif plan`: the influence step of a run compiled for a TPU slice or NVIDIA GPUs, on
this machine (no chip needed: the libtpu wheel's compiler, the JAX CUDA plugin's), with
per-device memory, FLOPs and a roofline (`influence.plan`). Compiler estimates, not
measurements."""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import LayerIFError
from .common import DEFAULT_MODEL, DTYPES, Command, LoraArgs, OverwriteArgs, out_file
from .options import REQUIRED, byte_size, model_path, opt, output_path, positive_int


def _topology(s: str) -> str:
    from ..chips import parse_topology
    try:
        return str(parse_topology(s))
    except LayerIFError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class PlanConfig(OverwriteArgs, LoraArgs):
    topology: str = opt(REQUIRED, "the chips: a TPU slice TPU:AxB[xC] (v4, v5e, v5p, v6e; "
                                  "e.g. v5e:2x4) or GPUs GPU, GPUxN, GPU:HOSTSxN (h100, h200; "
                                  "e.g. h200x8)", type=_topology)
    model: str | None = opt(None, "HF checkpoint dir, .gguf file or a `layerif convert` output "
                                  "(only its configuration is read)", type=model_path,
                            shown=DEFAULT_MODEL)
    config: str | None = opt(None, "a config.json, or a model type whose transformers default "
                                   "configuration to plan for (mistral: Mistral-7B, llama: "
                                   "Llama-2-7B shapes)", shown="none")
    n: int = opt(300, "training examples", type=positive_int)
    m: int = opt(50, "validation examples", type=positive_int)
    tokens: int = opt(128, "tokens per example", type=positive_int)
    dtype: str = opt("bfloat16", "dtype of the weights and of the forward/backward",
                     choices=DTYPES)
    chunk_size: int = opt(8, "examples per packed chunk, over all devices (as `layerif "
                             "scores --chunk-size`)", type=positive_int)
    chunks_per_call: int = opt(1, "packed chunks per compiled call", type=positive_int)
    memory_budget: str | None = opt(None, "bytes for kept training gradients over all "
                                          "devices (e.g. 16GB)", type=byte_size,
                                    shown="keep all")
    no_costs: bool = opt(False, "memory only: skip the FLOP counts (two more small compiles)")
    kernels: str = opt("auto", "auto: the Pallas kernels written for the chip (as a run on it "
                               "takes them); reference: their pure-JAX references",
                       choices=("auto", "reference"))
    sharding: str = opt("dp", "how the parameters are laid out: dp (whole on every chip), "
                              "fsdp (split over the data axis), fsdp_tp (and heads, MLP and "
                              "vocabulary over the model axis)", choices=("dp", "fsdp", "fsdp_tp"))
    mesh: str | None = opt(None, "DATAxMODEL mesh of the slice's chips (e.g. 2x4), with "
                                 "--sharding fsdp or fsdp_tp", shown="all chips on data")
    remat: str | None = opt(None, "recompute the blocks in the backward: mlp (the default "
                                  "when given alone: the attention half kept, the MLP half "
                                  "recomputed, about +25%% FLOPs) or full (only the residual "
                                  "stream between blocks kept, about +50%% FLOPs)",
                            choices=("mlp", "full"), nargs="?", const="mlp", shown="off")
    out: str | None = opt(None, "write the plan as JSON", type=output_path, shown="print only")

    def __post_init__(self):
        if self.model is not None and self.config is not None:
            raise LayerIFError("give --model or --config, not both")
        if self.tokens < 2:
            raise LayerIFError(f"--tokens must be >= 2, got {self.tokens}")
        if self.mesh is not None:
            from ..sharding import make_mesh_shape
            make_mesh_shape(self.mesh)


def model_config(cfg: PlanConfig):
    """(name, ModelConfig) of --model or --config."""
    from pathlib import Path

    from ..models.config import SUPPORTED, ModelConfig
    if cfg.config is None:
        from ..formats import load_config
        from ..io import default_model_path
        source = cfg.model or str(default_model_path())
        return source, load_config(source)
    p = Path(cfg.config).expanduser()
    if p.exists():
        return str(p), ModelConfig.from_file(p / "config.json" if p.is_dir() else p)
    if cfg.config not in SUPPORTED:
        raise LayerIFError(f"--config {cfg.config!r} is neither a file nor a model type "
                           f"(model types: {', '.join(SUPPORTED)})")
    from transformers import AutoConfig
    return (f"{cfg.config} (transformers' default configuration)",
            ModelConfig.from_hf(AutoConfig.for_model(cfg.config).to_dict()))


def run(cfg: PlanConfig, rt) -> None:
    import jax
    if not jax.config.jax_platforms:   # a plan never uses this machine's accelerators
        jax.config.update("jax_platforms", "cpu")
    # ahead-of-time programs cannot be read back from the persistent cache (no TPU or GPU
    # client): do not write them there
    jax.config.update("jax_enable_compilation_cache", False)
    from ..influence.plan import plan

    with out_file(cfg.out, "plan", cfg.overwrite) as out:
        name, mcfg = model_config(cfg)
        p = plan(mcfg, cfg.lora_config(), topology_spec=cfg.topology, n=cfg.n, m=cfg.m,
                 tokens=cfg.tokens, dtype=cfg.dtype, chunk_size=cfg.chunk_size,
                 chunks_per_call=cfg.chunks_per_call, memory_budget=cfg.memory_budget,
                 costs=not cfg.no_costs, model_name=name, kernels=cfg.kernels,
                 sharding=cfg.sharding, mesh_shape=cfg.mesh, remat=cfg.remat)
        print("\n".join(p.lines()))
        if out:
            out.write_json(p.to_json())
            print(f"plan -> {cfg.out}")


COMMAND = Command("plan", "compile the influence step for TPU or GPU chips here: per-device "
                          "memory, FLOPs, roofline (compiler estimates)", PlanConfig, run)
