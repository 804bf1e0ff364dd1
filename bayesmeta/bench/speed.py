"""Meta-training throughput: the batched inner loop against a per-task loop.

The baseline is written the way learn2learn's MAML is used: for each task, clone the
parameters, adapt them with ``autograd.grad`` (``create_graph`` for second order), and
backpropagate that task's query loss before moving to the next task.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call

from bayesmeta.data import TaskBatch
from bayesmeta.inference import MetaLearner

__all__ = ["per_task_meta_step", "time_meta_steps"]


def per_task_meta_step(learner: MetaLearner, batch: TaskBatch, first_order: bool = False) -> float:
    """One MAML meta-step over the tasks of ``batch``, one task at a time (the baseline)."""
    model, net = learner.model, learner.model.net
    lik = model.likelihood
    learner.optimizer.zero_grad(set_to_none=True)
    T = batch.num_tasks
    total = 0.0
    for t in range(T):
        params = dict(net.named_parameters())
        for _ in range(learner.inner.steps):
            out = functional_call(net, params, (batch.support_x[t],))
            loss = -lik.log_prob(out, batch.support_y[t]).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {
                n: p - learner.inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)
            }
        out = functional_call(net, params, (batch.query_x[t],))
        query = -lik.log_prob(out, batch.query_y[t]).mean() / T
        query.backward()
        total += query.item()
    learner.optimizer.step()
    return total


def time_meta_steps(
    candidates: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved round by round so that
    a noisy, shared machine slows every candidate alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
