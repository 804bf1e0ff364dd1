"""A likelihood's predictive statistics: who owns them, the exact Gaussian ones against the
generic mixture's, and a likelihood of labels of one's own scored through them."""

from __future__ import annotations

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.inference import Prediction
from bayesmeta.models import (
    Bernoulli,
    BinaryPredictive,
    Categorical,
    GaussianPredictive,
    HeteroscedasticNormal,
    HierarchicalBNN,
    LabelPredictive,
    Likelihood,
    Normal,
    RealPredictive,
    StudentT,
)
from bayesmeta.nets import MLP


def test_each_shipped_likelihood_names_its_predictive():
    assert type(Categorical().predictive) is LabelPredictive
    assert type(Bernoulli().predictive) is BinaryPredictive
    assert type(Normal(0.3).predictive) is GaussianPredictive
    assert type(StudentT().predictive) is RealPredictive
    assert type(HeteroscedasticNormal().predictive) is RealPredictive


def test_prediction_refuses_a_kind_that_is_not_its_likelihoods():
    f = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="kind must be the likelihood's, 'classification'"):
        Prediction(f, "regression", likelihood=Categorical())
    with pytest.raises(ValueError, match="kind must be one of .* got 'counts'"):
        Prediction(f, "counts")


def test_a_prediction_without_a_likelihood_reads_its_outputs_by_kind():
    f = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    alone = Prediction(f, "classification")
    given = Prediction(f, "classification", likelihood=Categorical())
    torch.testing.assert_close(alone.probs, torch.softmax(f, -1).mean(0), rtol=0, atol=0)
    torch.testing.assert_close(alone.mutual_information, given.mutual_information)
    with pytest.raises(AttributeError, match="stddev is defined for regression"):
        _ = alone.stddev


class _MonteCarloNormal(Normal):
    """A Normal likelihood scored by the generic mixture's draws, not in closed form."""

    predictive = RealPredictive()


def test_gaussian_scores_match_the_mixtures_draws():
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(3, 2, 40, 1, generator=g), torch.randn(2, 40, 1, generator=g)
    exact = Prediction(f, "regression", likelihood=Normal(0.5))
    drawn = Prediction(f, "regression", likelihood=_MonteCarloNormal(0.5))
    torch.testing.assert_close(exact.mean, drawn.mean)
    torch.testing.assert_close(exact.stddev, drawn.stddev)
    torch.testing.assert_close(exact.mutual_information, drawn.mutual_information)
    torch.testing.assert_close(exact.log_prob(y), drawn.log_prob(y))
    # Monte Carlo from 1024 draws per point: about 3% of the predictive's spread
    spread = exact.stddev
    for q in (0.1, 0.5, 0.9):
        gap = (exact.quantile(q) - drawn.quantile(q, torch.Generator().manual_seed(2))) / spread
        assert gap.abs().mean() < 0.06, (q, gap.abs().mean())
    crps_gap = exact.crps(y) - drawn.crps(y, torch.Generator().manual_seed(3))
    assert crps_gap.abs().mean() < 0.03 * spread.mean()


class _SmoothedLabels(Likelihood):
    """Class labels with ε label smoothing: a likelihood of labels that is not Categorical,
    scored as one by naming the label predictive."""

    kind = "classification"
    predictive = LabelPredictive()

    def log_prob(self, f, y):
        logp = torch.log_softmax(f, -1)
        hit = logp.gather(-1, y.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return 0.9 * hit + 0.1 * logp.mean(-1)

    def sample(self, f, generator=None):
        return Categorical().sample(f, generator)

    def check_targets(self, y, out_features, name="y"):
        Categorical().check_targets(y, out_features, name)


class _Blobs:
    """Two-way tasks: the class of x is which of two task-specific centres it is nearer."""

    def sample(self, num_tasks, generator=None):
        centres = 2 * torch.randn(num_tasks, 2, 2, generator=generator)
        y = torch.randint(2, (num_tasks, 12), generator=generator)
        x = centres.gather(1, y.unsqueeze(-1).expand(-1, -1, 2)) + torch.randn(
            num_tasks, 12, 2, generator=generator
        )
        return TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


def test_a_likelihood_of_labels_of_ones_own_is_scored_as_a_classifier():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [16], 2), _SmoothedLabels())
    learner = bm.MetaLearner(model, "maml")
    learner.fit(_Blobs(), meta_steps=3, meta_batch=4, seed=0, progress=False)
    scores = bm.evaluate(learner, _Blobs(), num_tasks=8, meta_batch=4)
    assert {"accuracy", "ece", "brier"} <= scores.keys() and "mse" not in scores
    assert 0 <= scores["accuracy"] <= 1
    batch = _Blobs().sample(2, torch.Generator().manual_seed(1))
    pred = learner.adapt(batch.support_x, batch.support_y).predict(batch.query_x)
    assert set(bm.inference.uncertainty_scores(pred)) == {
        "entropy",
        "mutual_information",
        "neg_max_logit",
        "energy",
    }


def test_a_likelihood_that_names_no_predictive_gets_its_kinds():
    class Labels(_SmoothedLabels):
        pass

    class PlainLabels(Likelihood):
        kind = "classification"

    class Flags(Likelihood):
        kind = "multilabel"

    class Reals(Likelihood):
        kind = "regression"

    assert type(PlainLabels.predictive) is LabelPredictive
    assert type(Flags.predictive) is BinaryPredictive
    assert type(Reals.predictive) is RealPredictive
    assert Labels.predictive is _SmoothedLabels.predictive  # (named up the line: kept)
    assert type(_MonteCarloNormal.predictive) is RealPredictive


def test_a_prediction_keeps_the_noise_it_was_made_with():
    lik = Normal(0.5, learn_noise=True)
    pred = Prediction(torch.zeros(2, 1, 3, 1), "regression", likelihood=lik)
    with torch.no_grad():
        lik.log_noise.add_(1.0)  # (a meta-step moves a learned noise on)
    torch.testing.assert_close(pred.stddev, torch.full((1, 3, 1), 0.5))
    assert pred.noise is not None and not pred.noise.requires_grad
    with pytest.raises(ValueError, match="without a likelihood needs its noise"):
        Prediction(torch.zeros(2, 1, 3, 1), "regression")


def test_quantiles_of_labels_are_refused_before_their_levels_are_checked():
    pred = Prediction(torch.zeros(1, 1, 2, 3), "classification")
    with pytest.raises(AttributeError, match="quantile is defined for regression"):
        pred.quantile(1.5)
    with pytest.raises(ValueError, match=r"q must lie in \(0, 1\)"):
        Prediction(torch.zeros(1, 1, 2, 1), "regression", torch.tensor(1.0)).quantile(1.5)
