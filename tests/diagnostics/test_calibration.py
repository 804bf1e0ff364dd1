"""Calibration scores against exact answers, coverage against binomial error, and the plot."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import bayesmeta.diagnostics as dg
from bayesmeta.inference import Prediction, metrics


def test_reexports_are_the_inference_metrics():
    for name in (
        "expected_calibration_error",
        "calibration_bins",
        "brier_score",
        "interval_coverage",
        "mean_ci",
    ):
        assert getattr(dg, name) is getattr(metrics, name)


def test_ece_of_a_calibrated_predictor_is_near_zero():
    """Labels drawn from the predicted probabilities: ECE is only sampling noise.

    With M points in B bins the noise is about sqrt(B / (4 M)) ≈ 0.004 here; tolerance 0.01.
    """
    g = torch.Generator().manual_seed(0)
    M, N = 200_000, 5
    logits = 2.0 * torch.randn(M, N, generator=g)
    probs = torch.softmax(logits, -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    ece, mce = dg.expected_calibration_error(probs, labels, bins=15)
    assert ece < 0.01
    assert mce < 0.05


def test_ece_of_an_over_confident_predictor_is_exact():
    """Four points at confidence 0.9 with one right, two at 0.6 both right (15 bins):
    ECE = 4/6 |0.25 − 0.9| + 2/6 |1 − 0.6| = 0.5666…, MCE = 0.65."""
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.4, 0.6]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    ece, mce = dg.expected_calibration_error(probs, labels, bins=15)
    assert ece == pytest.approx(4 / 6 * 0.65 + 2 / 6 * 0.4, abs=1e-12)
    assert mce == pytest.approx(0.65, abs=1e-12)
    # Brier: 1 right at 0.9 gives 2·0.1², 3 wrong give 2·0.9², 2 right at 0.6 give 2·0.4².
    assert dg.brier_score(probs, labels) == pytest.approx((0.02 + 3 * 1.62 + 2 * 0.32) / 6)


def _binomial_ok(table, sigmas=4.0):
    return ((table["coverage"] - table.index.to_series()).abs() <= sigmas * table["se"]).all()


@pytest.mark.slow
def test_coverage_of_the_true_predictive_is_nominal():
    """y drawn from the predictive mixture itself: coverage within 4 binomial sd."""
    g = torch.Generator().manual_seed(1)
    P, T, Qn = 8, 10, 200
    outputs = 2.0 * torch.randn(P, T, Qn, 1, generator=g)
    noise = torch.tensor(0.5)
    pick = torch.randint(P, (T, Qn, 1), generator=g)
    y = outputs.gather(0, pick.unsqueeze(0)).squeeze(0) + noise * torch.randn(T, Qn, 1, generator=g)
    table = dg.coverage_table(Prediction(outputs, "regression", noise), y)
    assert table.index.tolist() == [0.5, 0.8, 0.9, 0.95]
    assert (table["n"] == T * Qn).all()
    assert _binomial_ok(table), table


def test_coverage_of_predictive_draws():
    g = torch.Generator().manual_seed(2)
    draws = torch.randn(2000, 40, 50, generator=g)
    y = torch.randn(40, 50, generator=g)
    table = dg.coverage_table(draws, y, levels=(0.5, 0.9))
    assert _binomial_ok(table), table
    assert table.loc[0.9, "width"] == pytest.approx(2 * 1.6449, rel=0.03)


@pytest.mark.slow
def test_coverage_flags_an_over_confident_predictive():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(1, 2000, 1, generator=g)
    table = dg.coverage_table(
        Prediction(torch.zeros(1, 1, 2000, 1), "regression", torch.tensor(0.3)), y
    )
    assert (table["z"] < -10).all()


def test_coverage_table_rejects_bad_input():
    with pytest.raises(ValueError, match="levels"):
        dg.coverage_table(torch.randn(10, 5), torch.randn(5), levels=(1.5,))
    with pytest.raises(ValueError, match="draws"):
        dg.coverage_table(torch.randn(10, 4), torch.randn(5))


def test_predictive_entropy():
    N = 7
    assert dg.predictive_entropy(torch.full((3, N), 1 / N)).tolist() == pytest.approx(
        [math.log(N)] * 3
    )
    assert dg.predictive_entropy(torch.eye(N)).tolist() == [0.0] * N
    pred = Prediction(torch.zeros(2, 1, 4, 3), "classification")
    assert dg.predictive_entropy(pred).shape == (1, 4)


def test_reliability_diagram(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2000, 5, generator=g), -1)
    labels = torch.randint(5, (2000,), generator=g)
    ax = dg.reliability_diagram(probs, labels)
    assert ax.get_ylabel() == "accuracy"
    assert ax.figure.axes[1].get_xlabel().startswith("confidence")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    ece, _ = dg.expected_calibration_error(probs, labels)
    assert any(f"ECE = {ece:.3f}" in t for t in texts)
    assert "perfect calibration" in texts
    assert len(ax.figure.axes) == 2  # the confidence histogram panel
    path = tmp_path / "reliability.png"
    ax.figure.savefig(path)
    with Image.open(path) as im:
        im.verify()
    import matplotlib.pyplot as plt

    fig, own = plt.subplots()
    assert dg.reliability_diagram(probs, labels, bins=10, ax=own) is own
    assert own.get_xlabel().startswith("confidence")
    assert len(fig.axes) == 1
    plt.close("all")
