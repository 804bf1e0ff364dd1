"""Calibration: reliability diagrams, interval coverage and predictive entropy.

The scores themselves (:func:`expected_calibration_error`, :func:`calibration_bins`,
:func:`brier_score`, :func:`interval_coverage`, :func:`mean_ci`, :func:`auroc`,
:func:`risk_coverage`) live in
:mod:`bayesmeta.inference.metrics`, because ``bayesmeta.evaluate`` needs them; they are
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bayesmeta.diagnostics._mpl import pyplot
from bayesmeta.inference.metrics import (
    auroc,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    interval_coverage,
    mean_ci,
    risk_coverage,
)
from bayesmeta.inference.posterior import Prediction
from bayesmeta.models import RealPredictive

__all__ = [
    "auroc",
    "risk_coverage",
    "brier_score",
    "calibration_bins",
    "coverage_table",
    "expected_calibration_error",
    "interval_coverage",
    "mean_ci",
    "predictive_entropy",
    "reliability_diagram",
]


def reliability_diagram(
    probs: torch.Tensor,
    labels: torch.Tensor,
    bins: int = 15,
    ax=None,
    title: str | None = "Reliability diagram",
):
    """Accuracy against confidence per equal-width confidence bin (Guo et al. 2017).

    Bars are the accuracy of each bin, the red hatched part the gap to the bin's mean
    confidence, the dashed diagonal perfect calibration; ECE and MCE are in the legend.

    Parameters
    ----------
    probs : Tensor ``[M, N]`` (or ``[T, Q, N]``) predictive class probabilities
    labels : Tensor ``[M]`` (or ``[T, Q]``) true classes
    bins : number of bins on ``[0, 1]``
    ax : matplotlib Axes, optional. Without one, a figure with a second panel holding the
        histogram of confidences is made; with one, each bar is annotated with its count.
    title : axes title (``None`` for none)

    Returns
    -------
    The reliability Axes (its figure is ``ax.figure``).
    """
    h = calibration_bins(probs, labels, bins)
    ece, mce = expected_calibration_error(probs, labels, bins)
    edges = h["edges"].numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    full = (h["count"] > 0).numpy()
    acc = h["accuracy"].nan_to_num(0.0).numpy()
    conf = h["confidence"].nan_to_num(0.0).numpy()
    count = h["count"].numpy()
    plt = pyplot()
    hist_ax = None
    if ax is None:
        fig, (ax, hist_ax) = plt.subplots(
            2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    _bars(ax, centres[full], acc[full], conf[full], 1.0 / bins)
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1.2, label="perfect calibration")
    ax.plot([], [], " ", label=f"ECE = {ece:.3f}, MCE = {mce:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_aspect("auto")
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    if hist_ax is not None:
        hist_ax.bar(centres, count / count.sum(), width=1.0 / bins, color="gray",
                    edgecolor="black", linewidth=0.6)  # fmt: skip
        hist_ax.set_ylabel("fraction of\npoints")
        hist_ax.set_xlabel("confidence (top-class probability)")
        hist_ax.set_xlim(0, 1)
        ax.figure.tight_layout()
    else:
        ax.set_xlabel("confidence (top-class probability)")
        for x, n in zip(centres[full], count[full], strict=True):
            ax.annotate(f"{int(n)}", (x, 0.01), ha="center", va="bottom", fontsize=6,
                        rotation=90, color="white")  # fmt: skip
    return ax


def _bars(ax, centres, acc, conf, width: float) -> None:
    """Each non-empty bin's accuracy, and its gap to the bin's mean confidence (hatched)."""
    ax.bar(centres, acc, width=width, color="tab:blue", edgecolor="black", linewidth=0.6,
           label="accuracy")  # fmt: skip
    gap_low = [min(a, c) for a, c in zip(acc, conf, strict=True)]
    gap_height = [abs(a - c) for a, c in zip(acc, conf, strict=True)]
    ax.bar(centres, gap_height, bottom=gap_low, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap to confidence")  # fmt: skip


def _interval(pred, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = (1 - level) / 2, (1 + level) / 2
    if isinstance(pred, Prediction):
        return pred.quantile(lo), pred.quantile(hi)
    q = torch.tensor([lo, hi], dtype=pred.dtype, device=pred.device)
    bounds = torch.quantile(pred, q, dim=0)
    return bounds[0], bounds[1]


def coverage_table(
    pred: Prediction | torch.Tensor,
    y: torch.Tensor,
    levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95),
):
    """Empirical coverage of central predictive intervals.

    Parameters
    ----------
    pred : Prediction (regression; its exact mixture quantiles are used) or Tensor
        ``[P, *shape]`` of predictive draws (empirical quantiles over the first axis)
    y : Tensor ``[*shape]`` of targets, e.g. ``[T, Q, D]``
    levels : nominal coverages in ``(0, 1)``

    Returns
    -------
    pandas.DataFrame indexed by ``level`` with columns ``coverage``, ``se`` (binomial standard
    error ``sqrt(level (1 − level) / n)`` of the coverage of a calibrated predictive),
    ``z`` (``(coverage − level) / se``), ``width`` (mean interval width) and ``n``.
    """
    import pandas as pd

    if isinstance(pred, Prediction):
        if not isinstance(pred.likelihood.predictive, RealPredictive):
            raise AttributeError(
                f"coverage_table is defined for regression, this prediction is {pred.kind}"
            )
    elif not isinstance(pred, torch.Tensor) or pred.shape[1:] != y.shape:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred must be a Prediction or draws [P, *y.shape], got {got}")
    rows = []
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"levels must lie in (0, 1), got {level!r}")
        lower, upper = _interval(pred, level)
        y_ = y.to(lower)
        n = y_.numel()
        cov = interval_coverage(lower, upper, y_)
        se = math.sqrt(level * (1 - level) / n)
        width = (upper - lower).double().mean().item()
        rows.append(
            {
                "level": level,
                "coverage": cov,
                "se": se,
                "z": (cov - level) / se,
                "width": width,
                "n": n,
            }
        )
    return pd.DataFrame(rows).set_index("level")


def predictive_entropy(probs: torch.Tensor | Prediction) -> torch.Tensor:
    """Entropy ``−Σ_n p_n log p_n`` (nats) of predictive class probabilities.

    High entropy flags inputs the model is unsure about, e.g. out-of-distribution tasks; the
    maximum is ``log N``.

    Parameters
    ----------
    probs : Tensor ``[..., N]`` (rows summing to 1), or a classification Prediction

    Returns
    -------
    Tensor ``[...]``
    """
    if isinstance(probs, Prediction):
        probs = probs.probs
    if not isinstance(probs, torch.Tensor) or probs.dim() < 1:
        raise ValueError(f"probs must be a Tensor [..., N], got {type(probs).__name__}")
    return -torch.special.xlogy(probs, probs).sum(-1)
