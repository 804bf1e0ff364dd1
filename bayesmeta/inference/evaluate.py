"""Meta-test evaluation: adapt to held-out tasks and score the predictive."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesmeta.data import Sinusoid, TaskDistribution
from bayesmeta.inference._checks import check_int, check_seed
from bayesmeta.inference.distributed import chunk_generator, gather_objects, world
from bayesmeta.inference.metrics import (
    brier_score,
    expected_calibration_error,
    interval_coverage,
    mean_ci,
    risk_coverage,
)
from bayesmeta.inference.protocol import Adapts
from bayesmeta.inference.results import Evaluation

__all__ = ["evaluate", "COVERAGE_LEVELS"]

COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


def evaluate(
    learner: Adapts,
    tasks: TaskDistribution,
    num_tasks: int = 600,
    meta_batch: int = 50,
    seed: int = 0,
    bins: int = 15,
    return_scores: bool = False,
    progress: bool = False,
) -> Evaluation | tuple[Evaluation, dict[str, torch.Tensor]]:
    """Adapt to ``num_tasks`` sampled tasks and score the query predictions.

    Parameters
    ----------
    learner : a :class:`~bayesmeta.inference.MetaLearner`, or anything with ``adapt`` and
        ``device`` (:class:`~bayesmeta.inference.protocol.Adapts`)
    tasks : TaskDistribution; its batches are drawn with a generator seeded by ``seed``
    meta_batch : tasks adapted at once
    bins : equal-width bins of the ECE
    progress : show a progress bar of the tasks adapted (stderr)

    Inside a ``torch.distributed`` process group the ranks score whole batches in turn and
    every rank returns the scores of all ``num_tasks``: the same on any number of processes
    (each batch draws from a generator keyed by ``seed`` and its first task).
    return_scores : also return every query point's uncertainty scores (for out-of-distribution
        detection: :func:`bayesmeta.inference.metrics.auroc` of two conditions' scores)

    Returns
    -------
    Evaluation
        A read-only mapping of the scores that prints as a table (:meth:`Evaluation.to_dict`
        gives a plain dict). Accuracy is a fraction in ``[0, 1]``.
        Classification: ``accuracy``, ``accuracy_ci`` (half-width of the 95% CI over tasks),
        ``nll`` (mean over query points), ``ece``, ``mce``, ``brier``. Regression: ``mse``,
        ``mse_ci`` (predictive mean against the query targets, noise and all), ``nll``,
        ``coverage_50`` … ``coverage_95`` (central predictive intervals), ``crps``; for
        :class:`Sinusoid` tasks also ``function_mse``, ``function_mse_ci``: the predictive mean
        against the true, noise-free curve (Finn et al.'s sinusoid MSE; ``mse`` exceeds it by about
        the noise variance). Multi-label: ``accuracy`` over every label of every query point,
        ``nll``, and ``ece``, ``mce``, ``brier`` with each label a two-way decision. All:
        ``entropy`` and ``mutual_information`` (means over query points, :attr:`Prediction.entropy`
        / :attr:`~Prediction.mutual_information`), ``aurc`` (area under the risk-coverage curve of
        answering the most confident points first: by top probability against 0/1 error, or by
        predictive standard deviation against squared error). Always ``num_tasks`` (an int). With
        ``return_scores``, also a dict of ``entropy`` and ``mutual_information`` per query point
        (``[num_tasks · Q]``).

    Raises
    ------
    ValueError
        If the adaptation of a test task diverged (non-finite predictions); names the tasks.
    """
    check_int("num_tasks", num_tasks)
    check_int("meta_batch", meta_batch)
    check_seed("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    # The same draws either way; the true functions come along only where they are known.
    known = isinstance(tasks, Sinusoid)
    rank, size = world()
    scored: list[tuple[int, dict[str, torch.Tensor]]] = []
    done = 0
    bar = tqdm(
        total=num_tasks, disable=not progress or rank != 0, desc="test tasks", unit="task",
        leave=False,
    )  # fmt: skip
    try:
        while done < num_tasks:
            T = min(meta_batch, num_tasks - done)
            # Every rank draws every batch (the generators stay in step) and scores its share,
            # round robin, with draws keyed by the batch's first task: the same numbers on any
            # number of processes.
            if known:
                batch, truth = tasks.sample(T, generator=generator, return_params=True)
            else:
                batch, truth = tasks.sample(T, generator=generator), None
            if (done // meta_batch) % size == rank:
                scored.append((done, _score(learner, batch, truth, chunk_generator(seed, done))))
            done += T
            bar.update(T)
    finally:
        bar.close()
    parts = sorted((p for ranks in gather_objects(scored) for p in ranks), key=lambda p: p[0])
    broken = [start + int(i) for start, part in parts for i in part["broken"].nonzero().flatten()]
    if broken:
        # Scoring NaN would fail deep inside torch.distributions with a tensor dump.
        raise ValueError(
            f"adaptation diverged: non-finite predictions for test tasks {broken} of "
            f"{num_tasks}; lower the inner step size or the test-time inner steps"
        )
    cat = {k: torch.cat([part[k] for _, part in parts]) for k in parts[0][1] if k != "broken"}
    per_point = {k: cat[k] for k in ("entropy", "mutual_information")}
    result = Evaluation({"num_tasks": num_tasks, **_summary(cat, bins)})
    return (result, per_point) if return_scores else result


def _summary(cat: dict[str, torch.Tensor], bins: int) -> dict[str, float]:
    """The scores of every test task's points together (:func:`_score`'s, concatenated):
    calibration where they hold decisions' ``probs``, interval coverage where they hold
    ``targets``."""
    out = {"nll": cat["nll"].mean().item()}
    key = "accuracy" if "probs" in cat else "mse"
    out[key], out[f"{key}_ci"] = mean_ci(cat["per_task"])
    for name in ("entropy", "mutual_information"):
        out[name] = cat[name].mean().item()
    out["aurc"] = risk_coverage(cat["confidence"], cat["losses"])[2]
    if "probs" in cat:
        p, y = cat["probs"], cat["labels"]
        out["ece"], out["mce"] = expected_calibration_error(p, y, bins)
        out["brier"] = brier_score(p, y)
    if "function_errors" in cat:
        out["function_mse"], out["function_mse_ci"] = mean_ci(cat["function_errors"])
    if "targets" in cat:
        for c in COVERAGE_LEVELS:
            cov = interval_coverage(cat[f"lower_{c}"], cat[f"upper_{c}"], cat["targets"])
            out[f"coverage_{round(c * 100)}"] = cov
        out["crps"] = cat["crps"].mean().item()
    return out


def _score(
    learner: Adapts, batch: Any, truth: Any, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Adapt to one batch of test tasks and keep what :func:`evaluate` scores, on the CPU:
    per task (``per_task``, ``nll``, ``broken``) and per query point."""
    post = learner.adapt(batch.support_x, batch.support_y, generator=generator)
    qx = batch.query_x.to(learner.device)
    qy = batch.query_y.to(learner.device)
    threads = getattr(learner, "threads_context", None)
    points = qx.shape[0] * qx.shape[1] * getattr(learner, "eval_particles", 1)
    with contextlib.nullcontext() if threads is None else threads(points):
        pred = post.predict(qx, generator=generator)
    out = {
        "broken": ~torch.isfinite(pred.outputs).flatten(2).all(-1).all(0),  # [T]
        "entropy": pred.entropy.flatten(),
        "mutual_information": pred.mutual_information.flatten(),
    }
    if bool(out["broken"].any()):
        return {k: v.cpu() for k, v in out.items()}
    out["nll"] = -pred.log_prob(qy).mean(-1)
    out.update(pred.scores(qy, generator, COVERAGE_LEVELS))
    if truth is not None:
        curve = truth(batch.query_x).to(pred.mean)
        out["function_errors"] = (pred.mean - curve).square().mean((-1, -2))
    return {k: v.detach().cpu() for k, v in out.items()}
