"""Evaluation refuses to score an adaptation that diverged, and says which tasks did; its
result reads as a dict of fractions and prints as a table."""

import json
import pickle
from collections.abc import Mapping

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.models import Categorical, HierarchicalBNN, Normal
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


class _Halves:
    """Two-way tasks on the line: class 1 where x > c, c drawn per task."""

    def sample(self, num_tasks, generator=None):
        c = torch.randn(num_tasks, 1, 1, generator=generator)
        x = 2 * torch.randn(num_tasks, 12, 1, generator=generator)
        y = (x > c).long().squeeze(-1)
        return TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


def _classifier():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 2), Categorical(), prior_scale=None)
    return bm.MetaLearner(model, method="maml", inner_steps=2, inner_lr=0.3)


CLASSIFICATION = {"num_tasks", "nll", "accuracy", "accuracy_ci", "entropy",
                  "mutual_information", "aurc", "ece", "mce", "brier"}  # fmt: skip


def test_evaluation_holds_the_fraction_scored_by_hand_as_a_plain_dict():
    learner, tasks = _classifier(), _Halves()
    result = bm.evaluate(learner, tasks, num_tasks=6, meta_batch=6, seed=3)
    # The same tasks adapted by hand: accuracy is the fraction of queries right (MAML's
    # adaptation draws nothing).
    batch = tasks.sample(6, generator=torch.Generator().manual_seed(3))
    pred = learner.adapt(batch.support_x, batch.support_y).predict(batch.query_x)
    right = (pred.probs.argmax(-1) == batch.query_y).double().mean().item()
    assert result["accuracy"] == pytest.approx(right, abs=1e-12) and 0 < right < 1
    nll = -pred.log_prob(batch.query_y).mean().item()
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    plain = result.to_dict()
    assert type(plain) is dict and plain.keys() == CLASSIFICATION
    assert type(plain["num_tasks"]) is int and plain["num_tasks"] == 6
    assert all(type(v) is float for k, v in plain.items() if k != "num_tasks")
    # Code written against the dict of old (a float num_tasks) sees the same values.
    old = {k: float(v) for k, v in plain.items()}
    assert plain == old and result == old and bm.inference.Evaluation(old) == result
    assert json.loads(json.dumps(result.to_dict())) == plain
    scores, per_point = bm.evaluate(
        learner, tasks, num_tasks=6, meta_batch=6, seed=3, return_scores=True
    )
    assert isinstance(scores, bm.Evaluation) and scores == result
    assert per_point["entropy"].shape == (6 * 8,)


def test_evaluation_is_a_read_only_mapping():
    result = bm.Evaluation({"num_tasks": 4.0, "mse": 0.5, "mse_ci": 0.1})
    assert isinstance(result, Mapping) and not isinstance(result, dict)
    assert "mse" in result and "accuracy" not in result and len(result) == 3
    assert list(result) == list(result.keys()) == ["num_tasks", "mse", "mse_ci"]
    assert dict(result.items()) == {"num_tasks": 4, "mse": 0.5, "mse_ci": 0.1}
    assert result.get("accuracy") is None and result["mse_ci"] == 0.1
    with pytest.raises(TypeError):
        result["mse"] = 0.0  # type: ignore[index]
    copy = result.to_dict()
    copy["mse"] = 9.0
    assert result["mse"] == 0.5  # to_dict hands out a copy
    assert pickle.loads(pickle.dumps(result)) == result
    with pytest.raises(KeyError):
        result["accuracy"]


def test_evaluation_prints_one_line_per_score_accuracy_as_a_percentage():
    result = bm.Evaluation(
        {"num_tasks": 600.0, "nll": 0.312345678912345, "accuracy": 0.8934, "accuracy_ci": 0.0081}
    )
    assert str(result) == repr(result)
    assert str(result).splitlines() == [
        "nll          0.312",
        "accuracy     89.3%  ± 0.8",  # a percentage, its CI in percentage points
        "num_tasks      600",  # a count: no decimals, and last
    ]
    regression = bm.Evaluation(
        {"num_tasks": 20, "mse": 0.0123456, "mse_ci": 0.00351, "coverage_90": 0.875}
    )
    lines = str(regression).splitlines()
    assert lines == [
        "mse           0.0123  ± 0.0035",
        "coverage_90    0.875",
        "num_tasks         20",
    ]
    assert "%" not in str(regression)


def test_evaluation_refuses_what_is_not_a_score():
    with pytest.raises(ValueError, match="count 'num_tasks' must be a whole number, got 2.5"):
        bm.Evaluation({"num_tasks": 2.5})
    with pytest.raises(TypeError, match="score 'mse' must be a real number, got 'low'"):
        bm.Evaluation({"mse": "low"})
