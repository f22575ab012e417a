"""The accelerator chips ahead-of-time plans know (`influence.plan`): usable memory and
published peaks. Pure data: the CLI checks a topology with it before importing jax."""

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


# Published per-chip figures (Google Cloud TPU system architecture pages). hbm: v5e's is
# what XLA:TPU reports as available (15.75 GiB of 16 GiB); the others are the published size.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", int(15.75 * GiB), 197e12, 819e9,
                "cloud.google.com/tpu/docs/v5e; HBM: XLA:TPU's 'available HBM'"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
}
TOPOLOGY_FORM = "CHIP:AxB[xC] with CHIP one of " + ", ".join(CHIPS)


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
        return f"{self.chip_key}:{'x'.join(map(str, self.shape))}"


def parse_topology(spec: str) -> Topology:
    """'v5e:2x4' -> Topology('v5e', (2, 4)); anything else is refused, naming the known."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", str(spec).strip().lower())
    if not m or m.group(1) not in CHIPS or 0 in (shape := tuple(
            int(x) for x in m.group(2).split("x"))):
        raise LayerIFError(f"unknown topology {spec!r} (known: {TOPOLOGY_FORM}, e.g. v5e:2x4, "
                           "v6e:4x4, v5p:2x2x1)")
    return Topology(m.group(1), shape)
