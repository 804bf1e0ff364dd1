"""Scores of predictions: accuracy, calibration and interval coverage (pure tensor code).

``bayesmeta.diagnostics`` re-exports these beside its plots; they live here because
:func:`bayesmeta.evaluate` needs them and imports point one way.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "mean_ci",
    "calibration_bins",
    "expected_calibration_error",
    "brier_score",
    "interval_coverage",
    "auroc",
    "risk_coverage",
]


def mean_ci(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its normal-approximation confidence interval (``1.96·sd/√n``)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("values must be non-empty, got 0 elements")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)).item()
    sd = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), z * sd / math.sqrt(n)


def calibration_bins(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> dict[str, torch.Tensor]:
    """Confidence histogram for a reliability diagram.

    Parameters
    ----------
    probs : Tensor ``[M, N]`` predictive probabilities;  labels : Tensor ``[M]``
    bins : number of equal-width confidence bins on ``[0, 1]``

    Returns
    -------
    dict with ``edges [bins+1]``, ``count [bins]``, ``confidence [bins]`` (mean top-class
    probability) and ``accuracy [bins]`` (NaN where a bin is empty).
    """
    if bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins}")
    probs = probs.detach().reshape(-1, probs.shape[-1]).double()
    labels = labels.detach().reshape(-1)
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs and labels must hold the same number of points, got {probs.shape[0]} "
            f"and {labels.shape[0]}"
        )
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    # Bin i holds confidences in (edge_i, edge_{i+1}], the first also holds 0.
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    empty = count == 0
    safe = count.clamp_min(1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64),
        "count": count,
        "confidence": torch.where(empty, nan, conf_sum / safe),
        "accuracy": torch.where(empty, nan, acc_sum / safe),
    }


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> tuple[float, float]:
    """ECE and MCE over equal-width confidence bins.

    ``ECE = Σ_b (n_b / M) |acc_b − conf_b|``; ``MCE = max_b |acc_b − conf_b|`` over non-empty bins.
    """
    h = calibration_bins(probs, labels, bins)
    full = h["count"] > 0
    gap = (h["accuracy"][full] - h["confidence"][full]).abs()
    weights = h["count"][full] / h["count"].sum()
    return (weights * gap).sum().item(), gap.max().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over points of ``Σ_n (p_n − 1[y = n])²`` (0 is perfect, 2 is worst)."""
    probs = probs.detach().reshape(-1, probs.shape[-1]).double()
    onehot = torch.nn.functional.one_hot(labels.reshape(-1), probs.shape[-1]).double()
    return (probs - onehot).square().sum(-1).mean().item()


def interval_coverage(lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``y`` inside ``[lower, upper]`` (all the same shape)."""
    if not (lower.shape == upper.shape == y.shape):
        raise ValueError(
            f"lower, upper and y must share one shape, got {tuple(lower.shape)}, "
            f"{tuple(upper.shape)} and {tuple(y.shape)}"
        )
    return ((y >= lower) & (y <= upper)).double().mean().item()


def auroc(scores: torch.Tensor, shifted_scores: torch.Tensor) -> float:
    """Area under the ROC curve of telling shifted points from reference points by a score.

    The probability that a random shifted point scores higher than a random reference point,
    ties counted half (the Mann-Whitney statistic): 0.5 is chance, 1 separates them perfectly.
    Used with uncertainty scores (predictive entropy, mutual information) for out-of-distribution
    detection.

    Parameters
    ----------
    scores : Tensor ``[M]`` of the reference points;  shifted_scores : Tensor ``[M']``
    """
    a = scores.detach().double().flatten()
    b = shifted_scores.detach().double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(
            f"scores and shifted_scores must be non-empty, got {a.numel()} and {b.numel()}"
        )
    both = torch.cat([a, b])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=both.dtype)
    # Ties share their mean rank.
    values, inverse = torch.unique(both, return_inverse=True)
    sums = torch.zeros_like(values).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2
    return (u / (len(a) * len(b))).item()


def risk_coverage(
    confidence: torch.Tensor, loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Selective prediction: answer only the most confident points.

    Parameters
    ----------
    confidence : Tensor ``[M]`` (higher: more sure);  loss : Tensor ``[M]`` (e.g. 0/1 error)

    Returns
    -------
    coverage : Tensor ``[M]``, ``k / M`` for the ``k`` most confident points
    risk : Tensor ``[M]``, their mean loss
    aurc : float, the area under the risk-coverage curve (mean of ``risk``; lower is better)
    """
    confidence = confidence.detach().double().flatten()
    loss = loss.detach().double().flatten()
    if confidence.shape != loss.shape or confidence.numel() == 0:
        raise ValueError(
            f"confidence and loss must be non-empty and of one shape, got "
            f"{tuple(confidence.shape)} and {tuple(loss.shape)}"
        )
    order = confidence.argsort(descending=True, stable=True)
    k = torch.arange(1, len(loss) + 1, dtype=loss.dtype)
    risk = loss[order].cumsum(0) / k
    return k / len(loss), risk, risk.mean().item()
