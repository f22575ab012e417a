"""The accelerator chips ahead-of-time plans know (`influence.plan`): usable memory and
published peaks, and for GPUs the target description their compiler needs. Pure data: the
CLI checks a topology with it before importing jax."""

from __future__ import annotations

import dataclasses
import math
import re

from .errors import LayerIFError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: memory a program may use, and published peaks."""
    name: str
    platform: str          # jax platform: "tpu" | "cuda"
    hbm: int               # bytes of device memory a program can use
    peak_flops: float      # dense bfloat16 FLOP/s
    bandwidth: float       # HBM bytes/s
    source: str            # where the figures come from
    target_config: str = ""  # GPUs: the GpuTargetConfigProto (text) in layerif_jax/assets/gpu


# Published per-chip figures (Google Cloud TPU system architecture pages). hbm: v5e's is
# what XLA:TPU reports as available (15.75 GiB of 16 GiB); the others are the published size.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", int(15.75 * GiB), 197e12, 819e9,
                "cloud.google.com/tpu/docs/v5e; HBM: XLA:TPU's 'available HBM'"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA: dense bf16 tensor-core peak and HBM bandwidth of the SXM parts (nvidia.com
    # data sheets); hbm: 75% of the device memory, what JAX's client takes by default
    # (XLA_PYTHON_CLIENT_MEM_FRACTION=0.75)
    "h100": Chip("NVIDIA H100 SXM", "cuda", int(0.75 * 80 * GiB), 989e12, 3.35e12,
                 "nvidia.com/en-us/data-center/h100; hbm: JAX's default 75% of 80 GiB",
                 "h100.txtpb"),
    "h200": Chip("NVIDIA H200 SXM", "cuda", int(0.75 * 141 * GiB), 989e12, 4.8e12,
                 "nvidia.com/en-us/data-center/h200; hbm: JAX's default 75% of 141 GiB",
                 "h200.txtpb"),
}
TPUS = tuple(k for k, c in CHIPS.items() if c.platform == "tpu")
GPUS = tuple(k for k, c in CHIPS.items() if c.platform == "cuda")
TOPOLOGY_FORM = (f"TPU:AxB[xC] with TPU one of {', '.join(TPUS)}; GPU, GPUxN (N GPUs of one "
                 f"host) or GPU:HxN (H hosts) with GPU one of {', '.join(GPUS)}")


@dataclasses.dataclass(frozen=True)
class Topology:
    chip_key: str
    shape: tuple[int, ...]

    @property
    def chip(self) -> Chip:
        return CHIPS[self.chip_key]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        if self.chip.platform == "cuda" and self.shape[0] == 1:
            return self.chip_key + (f"x{self.shape[1]}" if self.shape[1] > 1 else "")
        return f"{self.chip_key}:{'x'.join(map(str, self.shape))}"


def parse_topology(spec: str) -> Topology:
    """'v5e:2x4' -> Topology('v5e', (2, 4)); 'h200x8' -> Topology('h200', (1, 8)) (hosts,
    GPUs per host), 'h200' one GPU, 'h200:2x8' two hosts; anything else is refused, naming
    the known."""
    s = str(spec).strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", s)
    if m and m.group(1) in TPUS:
        key, shape = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    elif m and m.group(1) in GPUS and m.group(2).count("x") == 1:
        key, shape = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    elif (g := re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", s)) and g.group(1) in GPUS:
        key, shape = g.group(1), (1, int(g.group(2) or 1))
    else:
        key, shape = None, ()
    if key is None or 0 in shape:
        raise LayerIFError(f"unknown topology {spec!r} (known: {TOPOLOGY_FORM}; e.g. v5e:2x4, "
                           "v6e:4x4, v5p:2x2x1, h200, h200x8)")
    return Topology(key, shape)
