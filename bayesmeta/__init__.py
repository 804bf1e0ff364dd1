"""bayesmeta: Bayesian meta-learning on Pyro and PyTorch.

>>> import bayesmeta as bm
>>> model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [40, 40], 1), bm.models.Normal(0.3))
>>> learner = bm.MetaLearner(model, method="bayes", inner_steps=5, inner_lr=0.1)
"""

from bayesmeta import data, inference, models, nets
from bayesmeta.inference import Evaluation, MetaLearner, evaluate

__all__ = ["data", "nets", "models", "inference", "MetaLearner", "evaluate", "Evaluation"]
__version__ = "0.1.0"
