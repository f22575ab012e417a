"""User-facing errors: one line, exit code 2 from the CLI."""


class LayerIFError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 2."""
