"""Layer-wise influence: the performance core (pure functions) and the LayerIF scores."""

from . import core
from .estimators import ESTIMATORS, Context, DataInf, Exact, Identity, get_estimator
from .partition import UNITS, Partition, make_partition
from .scores import AGGREGATES, LayerScores, layer_scores

__all__ = ["core", "ESTIMATORS", "Context", "DataInf", "Exact", "Identity", "get_estimator",
           "UNITS", "Partition", "make_partition", "AGGREGATES", "LayerScores", "layer_scores"]
