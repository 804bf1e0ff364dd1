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


@pytest.mark.slow
def test_sinusoid_function_mse_is_the_error_against_the_noise_free_curve():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [16], 1), Normal(0.3), prior_scale=None)
    learner = bm.MetaLearner(model, method="maml", inner_steps=2, inner_lr=0.01)
    clean = bm.evaluate(learner, bm.data.Sinusoid(5, 10), num_tasks=20, meta_batch=10)
    assert clean["function_mse"] == clean["mse"] > 0  # without noise the targets are the curve
    small = bm.data.Sinusoid(5, 10, amplitude=(0.1, 0.5), noise=0.3)
    noisy = bm.evaluate(learner, small, num_tasks=600, seed=2)
    # E(f̂ - y)² = E(f̂ - f)² + σ², the noise being independent of the prediction; the gap's
    # standard error over 6000 query points is sqrt(2σ⁴ + 4σ²·E(f̂ - f)²) / sqrt(6000) (0.006
    # here; small amplitudes keep E(f̂ - f)², and so the error, small).
    se = (2 * 0.3**4 + 4 * 0.09 * noisy["function_mse"]) ** 0.5 / 6000**0.5
    assert abs(noisy["mse"] - noisy["function_mse"] - 0.09) < 4 * se < 0.03
    assert 0 < noisy["function_mse_ci"] < noisy["function_mse"]
    assert "function_mse" not in bm.evaluate(learner, _Fixed(), num_tasks=1, meta_batch=1)
