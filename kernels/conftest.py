import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # a kernel test never probes for a TPU
