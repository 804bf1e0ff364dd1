"""Meta-test evaluation: adapt to held-out tasks and score the predictive."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from bayesmeta.data import Sinusoid, TaskDistribution
from bayesmeta.inference._checks import check_int, check_seed
from bayesmeta.inference.metrics import (
    brier_score,
    expected_calibration_error,
    interval_coverage,
    mean_ci,
    risk_coverage,
)

__all__ = ["evaluate", "COVERAGE_LEVELS"]

COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


def evaluate(
    learner: Any,
    tasks: TaskDistribution,
    num_tasks: int = 600,
    meta_batch: int = 50,
    seed: int = 0,
    bins: int = 15,
    return_scores: bool = False,
    progress: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Adapt to ``num_tasks`` sampled tasks and score the query predictions.

    Parameters
    ----------
    learner : MetaLearner (anything with ``adapt`` and ``eval_particles``)
    tasks : TaskDistribution; its batches are drawn with a generator seeded by ``seed``
    meta_batch : tasks adapted at once
    bins : equal-width bins of the ECE
    progress : show a progress bar of the tasks adapted (stderr)
    return_scores : also return every query point's uncertainty scores (for out-of-distribution
        detection: :func:`bayesmeta.inference.metrics.auroc` of two conditions' scores)

    Returns
    -------
    dict. Classification: ``accuracy``, ``accuracy_ci`` (half-width of the 95% CI over tasks),
    ``nll`` (mean over query points), ``ece``, ``mce``, ``brier``. Regression: ``mse``,
    ``mse_ci`` (predictive mean against the query targets, noise and all), ``nll``,
    ``coverage_50`` … ``coverage_95`` (central predictive intervals), ``crps``; for
    :class:`Sinusoid` tasks also ``function_mse``, ``function_mse_ci``: the predictive mean
    against the true, noise-free curve (Finn et al.'s sinusoid MSE; ``mse`` exceeds it by about
    the noise variance). Multi-label: ``accuracy`` over every label of every query point,
    ``nll``, and ``ece``, ``mce``, ``brier`` with each label a two-way decision. All:
    ``entropy`` and ``mutual_information`` (means over query points,
    :attr:`Prediction.entropy` / :attr:`~Prediction.mutual_information`), ``aurc`` (area under
    the risk-coverage curve of answering the most confident points first: by top probability
    against 0/1 error, or by predictive standard deviation against squared error). Always
    ``num_tasks``. With ``return_scores``, also a dict of ``entropy`` and
    ``mutual_information`` per query point (``[num_tasks · Q]``).

    Raises
    ------
    ValueError
        If the adaptation of a test task diverged (non-finite predictions); names the tasks.
    """
    check_int("num_tasks", num_tasks)
    check_int("meta_batch", meta_batch)
    check_seed("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    per_task, nll, probs, labels = [], [], [], []
    scores: dict[str, list[torch.Tensor]] = {"entropy": [], "mutual_information": []}
    confidence, losses, crps = [], [], []
    lower = {c: [] for c in COVERAGE_LEVELS}
    upper = {c: [] for c in COVERAGE_LEVELS}
    targets, function_errors = [], []
    # The same draws either way; the true functions come along only where they are known.
    known = isinstance(tasks, Sinusoid)
    done = 0
    bar = tqdm(total=num_tasks, disable=not progress, desc="test tasks", unit="task", leave=False)
    try:
        while done < num_tasks:
            T = min(meta_batch, num_tasks - done)
            if known:
                batch, truth = tasks.sample(T, generator=generator, return_params=True)
            else:
                batch = tasks.sample(T, generator=generator)
            post = learner.adapt(batch.support_x, batch.support_y, generator=generator)
            qx = batch.query_x.to(learner.device)
            qy = batch.query_y.to(learner.device)
            pred = post.predict(qx, generator=generator)
            broken = ~torch.isfinite(pred.outputs).flatten(2).all(-1).all(0)  # [T]
            if bool(broken.any()):
                # Scoring NaN would fail deep inside torch.distributions with a tensor dump.
                raise ValueError(
                    f"adaptation diverged: non-finite predictions for test tasks "
                    f"{(broken.nonzero().flatten() + done).tolist()} of {num_tasks}; lower the "
                    "inner step size or the test-time inner steps"
                )
            nll.append(-pred.log_prob(qy).mean(-1).cpu())
            scores["entropy"].append(pred.entropy.flatten().cpu())
            scores["mutual_information"].append(pred.mutual_information.flatten().cpu())
            if pred.kind == "classification":
                p = pred.probs
                per_task.append((p.argmax(-1) == qy).double().mean(-1).cpu())
                probs.append(p.reshape(-1, p.shape[-1]).cpu())
                labels.append(qy.reshape(-1).cpu())
                confidence.append(p.max(-1).values.flatten().cpu())
                losses.append((p.argmax(-1) != qy).double().flatten().cpu())
            elif pred.kind == "multilabel":
                # Every label is a two-way decision: accuracy and calibration over all of them.
                p, hit = pred.probs, (pred.probs > 0.5) == (qy > 0.5)  # [T, Q, L]
                per_task.append(hit.double().mean((-1, -2)).cpu())
                probs.append(torch.stack([1 - p, p], -1).reshape(-1, 2).cpu())
                labels.append((qy > 0.5).long().reshape(-1).cpu())
                confidence.append(torch.maximum(p, 1 - p).mean(-1).flatten().cpu())
                losses.append((~hit).double().mean(-1).flatten().cpu())
            else:
                error = (pred.mean - qy).square().mean(-1)  # [T, Q]
                per_task.append(error.mean(-1).cpu())
                confidence.append(-pred.stddev.mean(-1).flatten().cpu())
                losses.append(error.flatten().cpu())
                crps.append(pred.crps(qy, generator).flatten().cpu())
                if known:
                    curve = truth(batch.query_x).to(pred.mean)
                    function_errors.append((pred.mean - curve).square().mean((-1, -2)).cpu())
                for c in COVERAGE_LEVELS:
                    lower[c].append(pred.quantile((1 - c) / 2, generator).cpu())
                    upper[c].append(pred.quantile((1 + c) / 2, generator).cpu())
                targets.append(qy.cpu())
            done += T
            bar.update(T)
    finally:
        bar.close()
    out: dict[str, float] = {"num_tasks": float(num_tasks), "nll": torch.cat(nll).mean().item()}
    key = "accuracy" if probs else "mse"
    out[key], out[f"{key}_ci"] = mean_ci(torch.cat(per_task))
    per_point = {k: torch.cat(v) for k, v in scores.items()}
    for name, values in per_point.items():
        out[name] = values.mean().item()
    out["aurc"] = risk_coverage(torch.cat(confidence), torch.cat(losses))[2]
    if probs:
        p, y = torch.cat(probs), torch.cat(labels)
        out["ece"], out["mce"] = expected_calibration_error(p, y, bins)
        out["brier"] = brier_score(p, y)
    else:
        if function_errors:
            out["function_mse"], out["function_mse_ci"] = mean_ci(torch.cat(function_errors))
        y = torch.cat(targets)
        for c in COVERAGE_LEVELS:
            cov = interval_coverage(torch.cat(lower[c]), torch.cat(upper[c]), y)
            out[f"coverage_{round(c * 100)}"] = cov
        out["crps"] = torch.cat(crps).mean().item()
    return (out, per_point) if return_scores else out
