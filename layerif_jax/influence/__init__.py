"""Layer-wise influence: the performance core (pure functions), the engines, the
estimators and the two entry points.

    influence_scores(loss_fn, params, train, val, *, layer_of, ...)  any JAX model
    layer_scores(model, train, val, ...)                             an NNX model
"""

from . import core
from .aggregate import AGGREGATES, aggregate
from .api import influence_scores, layer_scores
from .driver import LayerScores
from .engines.general import CURVATURES, OutputLoss, sample_label
from .estimators import ESTIMATORS, Context, DataInf, Estimator, Exact, Identity, get_estimator, register
from .partition import UNITS, Partition, make_partition


def clear_caches() -> None:
    """Forget every compiled influence program (and jax's caches): the next call compiles."""
    import jax

    from .engines import general, packed
    jax.clear_caches()
    packed.clear_cache()
    general.clear_cache()
    api._nnx_loss.cache_clear()


from . import api  # noqa: E402

__all__ = ["core", "AGGREGATES", "aggregate", "influence_scores", "layer_scores", "LayerScores",
           "ESTIMATORS", "Context", "DataInf", "Estimator", "Exact", "Identity", "get_estimator",
           "register", "UNITS", "Partition", "make_partition", "clear_caches", "CURVATURES",
           "OutputLoss", "sample_label"]
