"""Which implementation a kernel entry point runs: the switch shared by all kernels.

The repository's top-level kernels/ folder installs as `layerif_jax.kernels`, a namespace
(no __init__.py): a regular top-level `kernels` package would shadow Hugging Face's
`kernels` (which transformers >= 5.25 imports) wherever the repository root is on the path.
Pallas kernels for the influence hot path, each with its pure-JAX reference.

Each kernel lives in `kernels/<name>/`: `reference.py` (pure JAX, the definition),
`tpu.py` (Pallas, Mosaic TPU), `gpu.py` (Pallas: Mosaic GPU for segment_grads, Triton
for segment_attention) where one exists, and its tests. Every entry point takes
`interpret: bool` (run the Pallas kernel in the interpreter, on any backend) and `impl`
("auto": the kernel on the platforms it is written for -- a TPU; an NVIDIA GPU for
`segment_grads` (Hopper) and `segment_attention` (Ampere on) -- the reference elsewhere;
"kernel"; "reference").
`switch.use(impl)` sets the default for a block of code (`LAYERIF_KERNELS` for a process).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import jax

IMPLS = ("auto", "kernel", "reference")
_DEFAULT: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar(
    "layerif_kernels", default=(None, False))


def _check(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernel implementation must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


@contextlib.contextmanager
def use(impl: str, *, interpret: bool = False):
    """The kernels' entry points inside the block run `impl` unless a call names its own:
    "kernel" (Pallas), "reference" (pure JAX) or "auto" (the kernel on the platforms it is
    written for, the reference elsewhere); interpret=True runs the Pallas kernels in the
    interpreter (any backend: how they are tested on CPU). For a whole process:
    LAYERIF_KERNELS=auto|kernel|reference|interpret."""
    token = _DEFAULT.set((_check(impl), interpret))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def setting() -> tuple:
    """The ambient choice (`use`'s and LAYERIF_KERNELS): a key for caches of traced code."""
    return _DEFAULT.get() + (os.environ.get("LAYERIF_KERNELS", ""),)


def local_platform(platform: str | None, cuda_majors: tuple[int, ...]) -> str:
    """The platform a trace is for: `platform`, else jax's default backend. A local
    NVIDIA GPU (jax's "gpu") is "cuda" -- the name an ahead-of-time compile for one
    passes -- when its compute capability's major version is one the kernel is written
    for, and stays "gpu" (no kernel) otherwise."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        if cc.split(".")[0].isdigit() and int(cc.split(".")[0]) in cuda_majors:
            return "cuda"
    return platform


def resolve(impl: str | None, interpret: bool | None, platform: str | None,
            kernel_platforms: tuple[str, ...]) -> tuple[str, bool]:
    """("kernel" | "reference", interpret) for a call: its own arguments, else `use(...)`'s,
    else LAYERIF_KERNELS, else auto. platform None: jax's default backend."""
    ctx_impl, ctx_interp = _DEFAULT.get()
    env = os.environ.get("LAYERIF_KERNELS", "")
    if env == "interpret":
        env_impl, env_interp = "kernel", True
    else:
        env_impl, env_interp = (env or None), False
    interpret = bool(interpret if interpret is not None else (ctx_interp or env_interp))
    impl = _check(impl or ctx_impl or env_impl or "auto")
    platform = platform or jax.default_backend()
    if impl == "auto":
        impl = "kernel" if interpret or platform in kernel_platforms else "reference"
    if impl == "kernel" and not interpret and platform not in kernel_platforms:
        raise ValueError(f"no kernel of this op is written for {platform} (only "
                         f"{', '.join(kernel_platforms)}): run it with interpret=True or "
                         "use the reference")
    return impl, interpret
