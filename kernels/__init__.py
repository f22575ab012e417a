"""Pallas kernels for the influence hot path, each with its pure-JAX reference.

Each kernel lives in `kernels/<name>/`: `reference.py` (pure JAX, the definition),
`tpu.py` (Pallas, Mosaic TPU), `gpu.py` (Pallas: Mosaic GPU for segment_grads, Triton
for segment_attention) where one exists, and its tests. Every entry point takes
`interpret: bool` (run the Pallas kernel in the interpreter, on any backend) and `impl`
("auto": the kernel on the platforms it is written for -- a TPU; an NVIDIA GPU for
`segment_grads` (Hopper) and `segment_attention` (Ampere on) -- the reference elsewhere;
"kernel"; "reference").
`kernels.use(impl)` sets the default for a block of code (`LAYERIF_KERNELS` for a process).
"""

from ._select import resolve, setting, use

__all__ = ["resolve", "setting", "use"]
