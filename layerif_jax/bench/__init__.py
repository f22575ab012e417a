"""Benchmarks of influence estimators, built in (`layerif bench`, or `run_bench` from
Python): every estimator on the same gradients, the same data and the same metrics.

digits      LDS and mislabel detection on scikit-learn's digits (logistic regression)
lm          cost / agreement and task detection on a causal LM with LoRA (SmolLM2)
lm_lds      LDS of a LoRA fine-tune of a causal LM (K retrains on random halves)
metrics     AUC, found-against-inspected, recall@k, LDS
report      the JSON, Markdown tables and plots
runner      the resumable run into one output folder
"""

from .digits import *  # noqa: F403
from .lm import *  # noqa: F403
from .lm_lds import *  # noqa: F403
from .metrics import *  # noqa: F403
from .report import *  # noqa: F403
from .runner import *  # noqa: F403
from . import digits, lm, lm_lds, metrics, report, runner

__all__ = (digits.__all__ + lm.__all__ + lm_lds.__all__ + metrics.__all__ + report.__all__ + runner.__all__)
