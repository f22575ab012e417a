"""Clean stops on SIGINT (Ctrl-C) and SIGTERM.

`graceful()` (the CLI wraps every command in it) installs handlers that only record
the signal. Long loops call `check()` at points where stopping is safe: after each
optimizer step (the trainer then saves a checkpoint), between influence calls,
evaluation batches and pruned blocks, between the tensors of a model being loaded.
`check()` raises `Interrupted`, a KeyboardInterrupt, so code that already cleans up
on Ctrl-C (`except KeyboardInterrupt`) handles both signals alike.

Raising from the handler itself is unsafe: Python runs it between any two bytecodes,
and an exception raised there is lost or mangled (seen: a Ctrl-C during `layerif
scores` swallowed by jax's gc callback, the run going on; a SIGTERM turned into a
ValueError inside a pytree comparison). So the handler never raises; a second signal
aborts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_state = {"signum": None, "active": False}


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


def requested() -> int | None:
    """The signal received since `graceful()` began, or None."""
    return _state["signum"]


def check() -> None:
    """Raise `Interrupted` if a stop was requested (a no-op outside `graceful()`)."""
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"])


def _handler(signum, frame):
    if _state["signum"] is not None:  # the second signal: stop now, whatever is running
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: aborting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODES.get(signum, 130))
    _state["signum"] = signum
    sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping at the next safe point "
                     "(send it again to abort now)\n")
    sys.stderr.flush()


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as described above, for the duration of the block."""
    if _state["active"]:
        yield
        return
    old = {s: signal.signal(s, _handler) for s in EXIT_CODES}
    _state.update(signum=None, active=True)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.update(signum=None, active=False)
