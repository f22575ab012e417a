"""memory.Peak: the growth of the resident set during a stretch of work on CPU, against
allocations of known size."""

import time

import jax.numpy as jnp
import numpy as np

from layerif_jax.memory import Peak, rss_bytes


def test_peak_sees_a_transient_allocation_of_known_size():
    assert rss_bytes() > 0
    with Peak() as p:
        a = np.ones(200 * 2 ** 20 // 8)          # 200 MiB, touched, then freed
        a += 1
        time.sleep(0.1)                          # held for 20 sampling intervals
        del a
    assert p.source == "rss"
    assert 190 * 2 ** 20 <= p.bytes <= 400 * 2 ** 20, p.bytes
    with Peak() as q:
        x = jnp.ones((64, 2 ** 20 // 64 * 32))   # a 128 MiB jax array on the CPU device
        x.block_until_ready()
        time.sleep(0.1)   # the sampler may read mid-fill (CI: 118.8 of 128 MiB); held, it sees all
        del x
    assert 120 * 2 ** 20 <= q.bytes, q.bytes
    with Peak() as r:
        pass
    assert r.bytes < 50 * 2 ** 20, r.bytes
