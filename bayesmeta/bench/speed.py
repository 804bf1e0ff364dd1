"""Meta-training throughput: the batched inner loop against a per-task loop.

The baseline is written the way learn2learn's MAML is used: for each task, clone the
parameters, adapt them with ``autograd.grad`` (``create_graph`` for second order), and
backpropagate that task's query loss before moving to the next task. :func:`loop_speed` times
it against ``MetaLearner.meta_step`` on one batch, and against learn2learn's ``MAML`` and
higher's ``innerloop_ctx`` when those libraries are importable (they are never required).
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.func import functional_call

from bayesmeta.data import TaskBatch
from bayesmeta.inference import MetaLearner
from bayesmeta.nets import takes_context

__all__ = [
    "per_task_meta_step",
    "time_meta_steps",
    "loop_speed",
    "method_costs",
    "external_baselines",
    "learn2learn_meta_step",
    "higher_meta_step",
]


def per_task_meta_step(learner: MetaLearner, batch: TaskBatch, first_order: bool = False) -> float:
    """One MAML meta-step over the tasks of ``batch``, one task at a time (the baseline)."""
    model, net = learner.model, learner.model.net
    lik = model.likelihood
    learner.optimizer.zero_grad(set_to_none=True)
    T = batch.num_tasks
    total = 0.0
    # Queries are normalised with their support set's statistics, as the batched loop does.
    context = takes_context(net)
    for t in range(T):
        params = dict(net.named_parameters())
        for _ in range(learner.inner.steps):
            out = functional_call(net, params, (batch.support_x[t],))
            loss = -lik.log_prob(out, batch.support_y[t]).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {
                n: p - learner.inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)
            }
        kwargs = {"context": batch.support_x[t]} if context else {}
        out = functional_call(net, params, (batch.query_x[t],), kwargs)
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


def method_costs(
    makers: dict[str, Callable[[], MetaLearner]],
    batch: TaskBatch,
    repeats: int = 3,
    warmup: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Seconds per ``meta_step`` on ``batch`` of each learner ``makers`` builds, interleaved."""
    learners = {name: make() for name, make in makers.items()}
    candidates = {
        name: partial(learner.meta_step, batch, generator) for name, learner in learners.items()
    }
    return time_meta_steps(candidates, repeats=repeats, warmup=warmup)


# Optional third-party per-task loops ---------------------------------------------------


def external_baselines() -> dict[str, str | None]:
    """Versions of the optional per-task MAML libraries that are importable (else ``None``)."""
    found: dict[str, str | None] = {}
    for name in ("learn2learn", "higher"):
        try:
            module = importlib.import_module(name)
        except Exception:  # ImportError, or a library broken against this torch
            found[name] = None
        else:
            found[name] = str(getattr(module, "__version__", "unknown"))
    return found


def _query_loss(lik, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -lik.log_prob(out, y).mean()


def learn2learn_meta_step(
    maml, optimizer: torch.optim.Optimizer, lik, batch: TaskBatch, steps: int
) -> None:
    """One meta-step with ``learn2learn.algorithms.MAML`` (``maml``), one task at a time."""
    optimizer.zero_grad(set_to_none=True)
    T = batch.num_tasks
    for t in range(T):
        fast = maml.clone()
        for _ in range(steps):
            fast.adapt(_query_loss(lik, fast(batch.support_x[t]), batch.support_y[t]))
        (_query_loss(lik, fast(batch.query_x[t]), batch.query_y[t]) / T).backward()
    optimizer.step()


def higher_meta_step(
    higher,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lik,
    batch: TaskBatch,
    steps: int,
    inner_lr: float,
) -> None:
    """One second-order meta-step with ``higher.innerloop_ctx``, one task at a time."""
    optimizer.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
    T = batch.num_tasks
    for t in range(T):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(_query_loss(lik, fnet(batch.support_x[t]), batch.support_y[t]))
            (_query_loss(lik, fnet(batch.query_x[t]), batch.query_y[t]) / T).backward()
    optimizer.step()


def _external_candidates(
    make: Callable[[], MetaLearner], batch: TaskBatch, first_order: bool
) -> dict[str, Callable[[], object]]:
    """Timed calls of the importable third-party loops on fresh copies of ``make()``'s net."""
    found = external_baselines()
    out: dict[str, Callable[[], object]] = {}
    if found["learn2learn"] is not None:
        l2l = importlib.import_module("learn2learn")
        learner = make()
        net = copy.deepcopy(learner.model.net)
        maml = l2l.algorithms.MAML(net, lr=learner.inner_lr, first_order=first_order)
        opt = torch.optim.Adam(maml.parameters(), lr=learner.meta_lr)
        lik, steps = learner.model.likelihood, learner.inner.steps
        out["learn2learn"] = partial(learn2learn_meta_step, maml, opt, lik, batch, steps)
    if found["higher"] is not None and not first_order:  # higher's first order cuts θ's gradient
        higher = importlib.import_module("higher")
        learner = make()
        net = copy.deepcopy(learner.model.net)
        opt = torch.optim.Adam(net.parameters(), lr=learner.meta_lr)
        lik, steps = learner.model.likelihood, learner.inner.steps
        out["higher"] = partial(
            higher_meta_step, higher, net, opt, lik, batch, steps, learner.inner_lr
        )
    return out


def loop_speed(
    make: Callable[[], MetaLearner],
    batch: TaskBatch,
    first_order: bool,
    repeats: int = 3,
    warmup: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Seconds per meta-step of the batched inner loop and of per-task loops, one batch.

    Parameters
    ----------
    make : callable returning a fresh MAML (``first_order``: FOMAML) learner; every candidate
        gets its own, so that each steps its own θ from the same start
    batch : TaskBatch of ``T`` tasks, on the learners' device

    Returns
    -------
    dict with ``"batched"`` (``MetaLearner.meta_step``), ``"per_task"``
    (:func:`per_task_meta_step`) and, where importable, ``"learn2learn"`` and ``"higher"``.
    """
    batched, base = make(), make()
    candidates: dict[str, Callable[[], object]] = {
        "batched": partial(batched.meta_step, batch, generator),
        "per_task": partial(per_task_meta_step, base, batch, first_order),
    }
    candidates.update(_external_candidates(make, batch, first_order))
    return time_meta_steps(candidates, repeats=repeats, warmup=warmup)
