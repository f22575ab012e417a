"""The one dtype table: the parameter / compute dtypes the package runs in.
(jax and numpy are imported on use, so the CLI can read NAMES while parsing.)"""

from __future__ import annotations

from .errors import LayerIFError

NAMES = ("float32", "bfloat16")
_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32",
            "bfloat16": "bfloat16", "bf16": "bfloat16"}


def name(dtype) -> str:
    """'float32' | 'bfloat16' from a name, an alias (fp32, bf16) or a jnp/np dtype."""
    import jax.numpy as jnp

    if isinstance(dtype, str) and dtype.lower() in _ALIASES:
        return _ALIASES[dtype.lower()]
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt == jnp.dtype(jnp.float32):
        return "float32"
    if dt == jnp.dtype(jnp.bfloat16):
        return "bfloat16"
    raise LayerIFError(f"unsupported dtype {dtype!r} (use float32 or bfloat16)")


def jnp_dtype(dtype):
    import jax.numpy as jnp
    return jnp.dtype(name(dtype))


def numpy_dtype(dtype):
    """The host dtype: numpy has no bfloat16, ml_dtypes provides it."""
    import ml_dtypes
    import numpy as np
    return np.dtype(ml_dtypes.bfloat16) if name(dtype) == "bfloat16" else np.dtype(np.float32)
