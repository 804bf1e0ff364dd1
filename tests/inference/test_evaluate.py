"""Evaluation refuses to score an adaptation that diverged, and says which tasks did."""

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP


class _Fixed:
    """Three regression tasks; task 1's support input overflows one inner step."""

    def sample(self, num_tasks, generator=None):
        x = torch.ones(num_tasks, 2, 1)
        x[1:2] = 1e30  # (a batch of one has no task 1)
        y = torch.zeros(num_tasks, 2, 1)
        return TaskBatch(x, y, torch.ones(num_tasks, 2, 1), y.clone())


def test_diverged_adaptation_names_its_tasks():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [4], 1), Normal(1.0), prior_scale=None)
    learner = bm.MetaLearner(model, method="maml", inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"non-finite predictions for test tasks \[1\] of 3"):
        bm.evaluate(learner, _Fixed(), num_tasks=3, meta_batch=3)
    scores = bm.evaluate(learner, _Fixed(), num_tasks=1, meta_batch=1)  # task 1 never drawn
    assert torch.isfinite(torch.tensor(scores["mse"]))
