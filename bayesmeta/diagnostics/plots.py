"""Posterior-predictive plots: regression bands against the truth, and ArviZ's PPC plot."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bayesmeta.diagnostics._mpl import pyplot
from bayesmeta.models import RealPredictive

__all__ = ["predictive_band_plot", "ppc_plot"]


def _task_indices(tasks: int | Sequence[int], T: int) -> list[int]:
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise ValueError(f"tasks must be a positive int or a list of task indices, got {tasks}")
        return list(range(min(tasks, T)))
    index = [int(t) for t in tasks]
    bad = [t for t in index if not 0 <= t < T]
    if bad or not index:
        raise ValueError(f"tasks must be indices in [0, {T}), got {list(tasks)}")
    return index


def predictive_band_plot(
    post,
    support: tuple[torch.Tensor, torch.Tensor],
    true_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    query: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    tasks: int | Sequence[int] = 4,
    grid: torch.Tensor | None = None,
    particles: int | None = None,
    generator: torch.Generator | None = None,
):
    """Predictive mean with 50% and 90% central bands of 1-D regression tasks, one panel each
    (up to four to a row).

    Parameters
    ----------
    post : TaskPosterior of ``T`` regression tasks with scalar inputs and outputs
    support : ``(x, y)``, Tensors ``[T, S, 1]``, the points the posterior was adapted to
    true_fn : maps ``x [T, G, 1]`` to the noise-free targets ``[T, G, 1]`` (e.g. the
        :class:`~bayesmeta.data.SinusoidParams` of the batch); drawn dashed when given
    query : ``(x, y)``, Tensors ``[T, Q, 1]``, held-out points drawn as open circles
    tasks : how many tasks to draw (the first ones), or their indices
    grid : Tensor ``[G]``, the inputs the bands are drawn at (default: 200 points over the
        data's range, 5% padded)
    particles : posterior draws of the predictive (default: the posterior's)

    Returns
    -------
    matplotlib Figure
    """
    T = post.num_tasks
    if not isinstance(post.model.likelihood.predictive, RealPredictive):
        raise ValueError(
            "predictive_band_plot is for regression posteriors; use "
            "reliability_diagram for classification"
        )
    data = dict(zip(("support_x", "support_y"), _pair("support", support, T), strict=True))
    data.update(zip(("query_x", "query_y"), _pair("query", query, T), strict=True))
    index = _task_indices(tasks, T)
    xs = [x for x in (data["support_x"], data["query_x"]) if x is not None]
    grid = _grid(post, xs, grid)
    pred = post.predict(grid, particles=particles, generator=generator)
    bands = {c: (pred.quantile((1 - c) / 2).cpu(), pred.quantile((1 + c) / 2).cpu())
             for c in (0.9, 0.5)}  # fmt: skip
    truth = true_fn(grid).cpu() if true_fn is not None else None
    curves = {"mean": pred.mean.cpu(), "truth": truth}
    g = grid[0, :, 0].cpu().numpy()

    plt = pyplot()
    ncols = min(4, len(index))
    nrows = math.ceil(len(index) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.3 * ncols, 2.8 * nrows), squeeze=False, sharex=True, sharey=True
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(index):
            ax.set_visible(False)
            continue
        t = index[k]
        _panel(ax, g, {c: (lo[t, :, 0], hi[t, :, 0]) for c, (lo, hi) in bands.items()},
               {n: None if v is None else v[t, :, 0] for n, v in curves.items()},
               {n: None if v is None else v[t, :, 0].cpu() for n, v in data.items()})  # fmt: skip
        ax.set_title(_task_title(true_fn, t), fontsize="medium")
        if k % ncols == 0:
            ax.set_ylabel("y")
        if k >= len(index) - ncols:
            ax.set_xlabel("x")
        ax.tick_params(labelbottom=True)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               fontsize="small")  # fmt: skip
    fig.tight_layout(rect=(0, 0.1 / nrows + 0.02, 1, 1))
    return fig


def _pair(name: str, pair, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``pair`` as ``(x, y)``, two Tensors ``[T, B, 1]`` (``None`` for an optional ``query``)."""
    if pair is None and name == "query":
        return None, None
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(t, torch.Tensor) for t in pair)
    ):
        raise ValueError(f"{name} must be a pair (x, y) of Tensors [T, B, 1], got {pair!r:.80}")
    for part, t in zip("xy", pair, strict=True):
        if t.dim() != 3 or t.shape[0] != T or t.shape[-1] != 1:
            raise ValueError(f"{name}'s {part} must have shape [T={T}, B, 1], got {tuple(t.shape)}")
    return pair[0], pair[1]


def _grid(post, xs: list[torch.Tensor], grid: torch.Tensor | None) -> torch.Tensor:
    """The inputs ``[T, G, 1]`` the bands are drawn at: ``grid``, else the data's range,
    padded, at 200 points."""
    device = next(post.model.parameters()).device
    if grid is None:
        lo = min(float(x.min()) for x in xs)
        hi = max(float(x.max()) for x in xs)
        pad = 0.05 * (hi - lo or 1.0)
        grid = torch.linspace(lo - pad, hi + pad, 200, device=device)
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        got = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ValueError(f"grid must be a Tensor [G] of at least 2 inputs, got {got}")
    return grid.to(device).expand(post.num_tasks, grid.numel()).unsqueeze(-1)


def _panel(ax, g, bands, curves, data) -> None:
    """One task's panel: its bands, predictive mean, true function and points."""
    for c, alpha in ((0.9, 0.18), (0.5, 0.35)):
        lower, upper = bands[c]
        ax.fill_between(g, lower, upper, color="tab:blue", alpha=alpha, linewidth=0,
                        label=f"{round(100 * c)}% predictive interval")  # fmt: skip
    ax.plot(g, curves["mean"], color="tab:blue", linewidth=1.6, label="predictive mean")
    if curves["truth"] is not None:
        ax.plot(g, curves["truth"], "--", color="black", linewidth=1.2, label="true function")
    if data["query_x"] is not None and data["query_y"] is not None:
        points = dict(s=14, facecolors="none", edgecolors="tab:gray", linewidths=0.8)
        ax.scatter(data["query_x"], data["query_y"], **points, label="query points", zorder=3)
    ax.scatter(data["support_x"], data["support_y"], s=28, color="tab:red", edgecolors="black",
               linewidths=0.5, label="support points", zorder=4)  # fmt: skip


def _task_title(true_fn, t: int) -> str:
    amplitude, phase = getattr(true_fn, "amplitude", None), getattr(true_fn, "phase", None)
    if amplitude is not None and phase is not None:
        return f"task {t}: A = {float(amplitude[t]):.2f}, φ = {float(phase[t]):.2f}"
    return f"task {t}"


def ppc_plot(idata, var_name: str = "obs", num_pp_samples: int = 50, ax=None, **kwargs):
    """``az.plot_ppc`` of ``idata`` (from :func:`to_inference_data`) with labelled axes.

    Regression: the observed query targets of all tasks against ``num_pp_samples``
    posterior-predictive replicates (KDEs). Classification: a histogram of a statistic that
    tells something in few-shot tasks, whose labels are balanced and permuted: each task's
    accuracy of the predicted class, on the observed labels against on replicated ones (they
    agree when the predictive probabilities are calibrated).

    Returns
    -------
    The matplotlib Axes.
    """
    import arviz as az

    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    pp = idata.posterior_predictive
    num_pp_samples = min(num_pp_samples, pp.sizes["chain"] * pp.sizes["draw"])
    if "probs" in pp and idata.observed_data[var_name].dtype.kind != "f":
        return _ppc_accuracy(idata, var_name, num_pp_samples, ax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ArviZ 0.23 on matplotlib 3.11
        ax = az.plot_ppc(
            idata,
            var_names=[var_name],
            num_pp_samples=num_pp_samples,
            ax=ax,
            random_seed=0,
            **kwargs,
        )
    ax = ax if not hasattr(ax, "flat") else ax.flat[0]
    discrete = not idata.observed_data[var_name].dtype.kind == "f"
    ax.set_xlabel("class label y" if discrete else "y (query targets, all tasks)", fontsize=11)
    ax.set_ylabel("probability" if discrete else "density", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.set_title("Posterior predictive check", fontsize=12)
    if ax.get_legend() is not None:
        ax.legend(fontsize=9, frameon=False)
    ax.figure.tight_layout()
    return ax


def _ppc_accuracy(idata, var_name: str, num_pp_samples: int, ax):
    """Classification PPC: per-task accuracy of the predicted class on observed labels against
    on ``num_pp_samples`` replicated label sets."""
    pp = idata.posterior_predictive
    probs = pp["probs"].values  # [chain, draw, T, Q, N]
    predicted = probs.reshape(-1, *probs.shape[2:]).mean(0).argmax(-1)  # [T, Q]
    observed = (predicted == idata.observed_data[var_name].values).mean(-1)  # [T]
    reps = pp[var_name].values.reshape(-1, *predicted.shape)[:num_pp_samples]  # [S, T, Q]
    replicated = (reps == predicted).mean(-1).ravel()
    bins = np.linspace(0, 1, min(predicted.shape[-1], 20) + 2)
    ax.hist(replicated, bins=bins, density=True, alpha=0.45, color="C0",
            label=f"replicated labels ({len(reps)} draws)")  # fmt: skip
    ax.hist(observed, bins=bins, density=True, histtype="step", lw=2, color="k",
            label="observed labels")  # fmt: skip
    ax.set_xlabel("per-task accuracy of the predicted class", fontsize=11)
    ax.set_ylabel("density", fontsize=11)
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=10)
    ax.set_title("Posterior predictive check", fontsize=12)
    ax.legend(fontsize=9, frameon=False)
    ax.figure.tight_layout()
    return ax
