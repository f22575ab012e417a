"""Peak memory of a stretch of work: `Peak()` around it, then `.bytes`.

On devices that report memory (`jax.Device.memory_stats()`: TPU, GPU) the figure is the
device's: the growth of its peak bytes in use over what was in use when the stretch
began (the peak counter cannot be reset, so a stretch whose peak stays under an earlier
one reads as at most that earlier peak minus its start: `.exact` is False then). On CPU
(no device memory stats; jax's arrays live in the process) it is the process's resident
set, sampled every `interval` seconds by a thread: its maximum during the stretch minus
its value at the start (work shorter than the interval can be missed; Linux /proc).
"""

from __future__ import annotations

import os
import threading

import jax

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """The process's resident set now (None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _device_stats():
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:   # noqa: BLE001  (backends without the call)
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats


class Peak:
    """with Peak() as p: ...; p.bytes (int or None where nothing can be measured),
    p.source ("device" | "rss" | None), p.exact."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.bytes, self.source, self.exact = interval, None, None, True
        self._stop = threading.Event()

    def __enter__(self):
        self._dev = _device_stats()
        if self._dev is not None:
            self.source = "device"
            return self
        self._start = rss_bytes()
        if self._start is None:
            return self
        self.source, self._max = "rss", self._start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and now > self._max:
                self._max = now

    def __exit__(self, *exc):
        if self.source == "device":
            after = _device_stats() or self._dev
            before_peak, in_use = self._dev["peak_bytes_in_use"], self._dev["bytes_in_use"]
            self.exact = after["peak_bytes_in_use"] > before_peak
            self.bytes = int(max(after["peak_bytes_in_use"] - in_use, 0))
        elif self.source == "rss":
            self._stop.set()
            self._thread.join()
            now = rss_bytes()
            self._max = max(self._max, now or 0)
            self.bytes = int(self._max - self._start)
        return False
