"""User-facing errors: one line, exit code 2 from the CLI."""


class LayerIFError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 2."""


class EstimatorsFailed(LayerIFError):
    """Some of several estimators run on the same gradients failed on their own (an
    iterative one that did not converge): raised after all the others ran, with their
    results. `results`: {name: result} of those that finished; `failures`: {name: the
    LayerIFError each raised}."""

    def __init__(self, results: dict, failures: dict):
        self.results, self.failures = results, failures
        super().__init__("; ".join(str(e) for e in failures.values())
                         + f" (the results of {', '.join(results) or 'no other estimator'} "
                           "are on this error's .results)")
