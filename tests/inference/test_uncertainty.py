"""Uncertainty scores against exact answers: entropy and mutual information of the predictive,
CRPS, ROC area and the risk-coverage curve."""

import math

import pytest
import torch

from bayesmeta.inference import Prediction
from bayesmeta.inference.metrics import auroc, risk_coverage


def test_classification_entropy_and_mutual_information(float64):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])  # two particles, one point
    pred = Prediction(probs.log().reshape(2, 1, 1, 3), "classification")
    mean = probs.mean(0)
    h = -(mean * mean.log()).sum()
    each = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(pred.entropy, h.reshape(1, 1))
    torch.testing.assert_close(pred.mutual_information, (h - each.mean()).reshape(1, 1))
    point = Prediction(probs[:1].log().reshape(1, 1, 1, 3), "classification")
    torch.testing.assert_close(point.mutual_information, torch.zeros(1, 1), atol=1e-12, rtol=0)


def test_regression_scores_split_the_noise_from_the_weights(float64):
    outputs = torch.tensor([1.0, 2.0, 4.0]).reshape(3, 1, 1, 1)
    noise = torch.tensor(0.5)
    pred = Prediction(outputs, "regression", noise)
    spread = outputs.var(0, unbiased=False)
    total = spread + 0.25
    torch.testing.assert_close(pred.entropy, 0.5 * (2 * math.pi * math.e * total).log()[..., 0])
    torch.testing.assert_close(pred.mutual_information, 0.5 * (total / 0.25).log()[..., 0])
    # A closed-form posterior's output variance is epistemic too.
    exact = Prediction(outputs[:1], "regression", noise, torch.full((1, 1, 1), 0.75))
    torch.testing.assert_close(exact.mutual_information, torch.tensor([[0.5 * math.log(4.0)]]))


def test_crps_of_one_gaussian_and_of_a_mixture(float64):
    mu, sd, y = 0.3, 0.7, torch.tensor([[[1.1]]])
    pred = Prediction(torch.full((1, 1, 1, 1), mu), "regression", torch.tensor(sd))
    z = (1.1 - mu) / sd
    normal = torch.distributions.Normal(0.0, 1.0)
    cdf, pdf = normal.cdf(torch.tensor(z)), normal.log_prob(torch.tensor(z)).exp()
    exact = sd * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    torch.testing.assert_close(pred.crps(y), exact.reshape(1, 1))
    # A two-particle mixture against Monte Carlo: E|Y − y| − E|Y − Y'|/2.
    mix = Prediction(torch.tensor([-1.0, 2.0]).reshape(2, 1, 1, 1), "regression", torch.tensor(0.4))
    g = torch.Generator().manual_seed(0)
    draws = mix.outputs[torch.randint(0, 2, (2, 400_000), generator=g)].flatten(1)
    draws = draws + 0.4 * torch.randn(draws.shape, generator=g)
    mc = (draws[0] - 1.1).abs().mean() - 0.5 * (draws[0] - draws[1]).abs().mean()
    torch.testing.assert_close(mix.crps(y), mc.reshape(1, 1), rtol=0, atol=5e-3)
    with pytest.raises(AttributeError, match="crps is defined for regression"):
        Prediction(torch.zeros(1, 1, 1, 3), "classification").crps(y)


def test_auroc_counts_pairs_and_ties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(2, 8, (30,), generator=g)
    pairs = (b.float()[:, None] > a[None]).double() + 0.5 * (b.float()[:, None] == a[None])
    assert auroc(a, b.float()) == pytest.approx(pairs.mean().item(), abs=1e-12)
    assert (
        auroc(torch.zeros(3), torch.ones(2)) == 1.0 and auroc(torch.ones(3), torch.ones(2)) == 0.5
    )
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.zeros(0), torch.ones(2))


def test_risk_coverage_answers_the_most_confident_first():
    coverage, risk, aurc = risk_coverage(
        torch.tensor([0.2, 0.9, 0.5, 0.7]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    )
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.0, 1 / 3, 0.5], dtype=torch.float64))
    assert aurc == pytest.approx((1 / 3 + 0.5) / 4)
    with pytest.raises(ValueError, match="of one shape"):
        risk_coverage(torch.ones(3), torch.ones(2))
