"""What the library tells its user while it works: the `layerif_jax` logger.

`note(msg)` (level WARNING) is something the user should know because it changes or
may surprise the result: records truncated, a limit larger than the data, gradients
that will be recomputed. `info(msg)` (level INFO) announces what is being done: a
resume, a reuse, the memory plan. The CLI prints notes as `note: ...` and infos as
plain lines on stderr; in a Python program they follow the logging configuration
(notes reach stderr by default, infos do not).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("layerif_jax")


def note(msg: str) -> None:
    logger.warning(msg)


def info(msg: str) -> None:
    logger.info(msg)


class _CliFormatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return f"note: {msg}" if record.levelno >= logging.WARNING else msg


def to_stderr(level: int = logging.INFO) -> logging.Handler:
    """Print the package's messages on stderr (the CLI's setting). Returns the handler."""
    import sys

    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_CliFormatter())
    logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    return h
