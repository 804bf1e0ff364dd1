""" "None of these": uncertainty scores of a prediction, and out-of-episode detection.

An out-of-episode query belongs to none of its task's classes. The protocol (Wang et al. 2020's
few-shot OOD protocol; Snell & Zemel 2021) draws ``2N``-way tasks, keeps the first ``N``
classes as the task (support and queries) and uses the other ``N`` classes' queries as
out-of-episode queries: as many as the in-episode ones. Every query is predicted from the
``N``-way support set alone; per task, the AUROC of telling the two apart by a score, averaged
over tasks.
"""

from __future__ import annotations

from typing import Any

import torch

from bayesmeta.data import TaskBatch
from bayesmeta.inference._checks import check_int, check_seed
from bayesmeta.inference.distributed import chunk_generator
from bayesmeta.inference.metrics import auroc, mean_ci
from bayesmeta.inference.posterior import Prediction

__all__ = ["uncertainty_scores", "split_out_of_episode", "evaluate_out_of_episode", "OOE_SCORES"]

#: The scores of a classifier's prediction, each higher for a query less like the task's
#: classes.
OOE_SCORES = ("entropy", "mutual_information", "neg_max_logit", "energy")


def uncertainty_scores(prediction: Prediction) -> dict[str, torch.Tensor]:
    """Per-query scores ``[T, Q]``, each higher where the query is less likely to belong to
    the task (out of episode, or out of distribution).

    ``entropy`` and ``mutual_information``: :attr:`Prediction.entropy` and
    :attr:`~Prediction.mutual_information`. Classification also: ``neg_max_logit``, minus the
    largest of the logits (averaged over the posterior draws), and ``energy``,
    ``−log Σ_k exp(logit_k)`` (Liu et al. 2020). For ``bayes-proto``, whose logits are the log
    densities ``log p(z | k, support)`` of the query's features, ``energy`` is the negative log
    predictive density of the features, ``−log Σ_k p(z | k)`` (up to ``log N``), and
    ``neg_max_logit`` the negative log density under the nearest class.
    """
    if not isinstance(prediction, Prediction):
        raise TypeError(f"prediction must be a Prediction, got {type(prediction).__name__}")
    return prediction.uncertainty_scores()


def split_out_of_episode(batch: TaskBatch, ways: int) -> tuple[TaskBatch, torch.Tensor]:
    """Cut ``2N``-way tasks into ``N``-way tasks and out-of-episode queries.

    Parameters
    ----------
    batch : a class-major batch of ``2N``-way tasks, with labels in ``[0, 2N)`` (as
        :class:`~bayesmeta.data.FewShotClassification` draws them: entry ``n · K + k`` of the
        support set is shot ``k`` of the class labelled ``n``)
    ways : ``N``

    Returns
    -------
    The ``N``-way tasks (the classes labelled ``0..N-1``, support ``[T, N·K, ...]`` and
    queries ``[T, N·Q, ...]``) and the other classes' queries ``[T, N·Q, ...]``.
    """
    T, S = batch.support_y.shape[:2]
    Q = batch.query_y.shape[1]
    if S % (2 * ways) or Q % (2 * ways):
        raise ValueError(
            f"batch must hold 2N = {2 * ways} classes of equal size, got {S} support and {Q} "
            "query points per task"
        )
    inside = batch.support_y[:, : S // 2] < ways, batch.query_y[:, : Q // 2] < ways
    if not (bool(inside[0].all()) and bool(inside[1].all())):
        raise ValueError("batch must be class-major with labels 0..2N-1 in order")
    tasks = TaskBatch(
        batch.support_x[:, : S // 2],
        batch.support_y[:, : S // 2],
        batch.query_x[:, : Q // 2],
        batch.query_y[:, : Q // 2],
        num_classes=ways,
    )
    return tasks, batch.query_x[:, Q // 2 :]


def evaluate_out_of_episode(
    learner: Any,
    tasks: Any,
    num_tasks: int = 600,
    meta_batch: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Out-of-episode detection AUROC of every score of :func:`uncertainty_scores`.

    Parameters
    ----------
    learner : a classifier's MetaLearner (anything with ``adapt(support_x, support_y,
        generator=...)``, :class:`~bayesmeta.inference.protocol.Adapts`)
    tasks : ``N``-way task distribution with ``with_ways`` (e.g.
        :class:`~bayesmeta.data.Omniglot`); its ``2N``-way twin is sampled with a generator
        seeded by ``seed``
    num_tasks, meta_batch : tasks scored, and adapted at once; the draws of each batch's
        adaptation and prediction come from one generator keyed by ``seed`` and the batch's
        first task, as :func:`~bayesmeta.inference.evaluate`'s do

    Returns
    -------
    ``auroc_<score>`` (the mean over tasks of each task's AUROC, out-of-episode queries the
    positives) and ``auroc_<score>_ci`` (the half-width of its 95% interval) for every score,
    and ``num_tasks``.
    """
    check_int("num_tasks", num_tasks)
    check_int("meta_batch", meta_batch)
    check_seed("seed", seed)
    ways = tasks.ways
    doubled = tasks.with_ways(2 * ways)
    generator = torch.Generator().manual_seed(seed)
    per_task: dict[str, list[float]] = {}
    done = 0
    while done < num_tasks:
        T = min(meta_batch, num_tasks - done)
        task_batch, outside = split_out_of_episode(doubled.sample(T, generator), ways)
        # Adaptation and prediction draw from one generator per batch, as evaluate's do: the
        # global one is seeded at random in every process.
        draws = chunk_generator(seed, done)
        post = learner.adapt(task_batch.support_x, task_batch.support_y, generator=draws)
        queries = torch.cat([task_batch.query_x, outside], 1).to(learner.device)
        pred = post.predict(queries, generator=draws)
        Q = task_batch.query_x.shape[1]
        for name, score in uncertainty_scores(pred).items():
            values = per_task.setdefault(name, [])
            values += [auroc(score[t, :Q], score[t, Q:]) for t in range(T)]
        done += T
    out: dict[str, float] = {"num_tasks": float(num_tasks)}
    for name, values in per_task.items():
        out[f"auroc_{name}"], out[f"auroc_{name}_ci"] = mean_ci(torch.tensor(values))
    return out
