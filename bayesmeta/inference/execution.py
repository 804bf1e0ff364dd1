"""How a learner's work runs: task chunks, shards over ranks, threads, and the memory check.

None of it changes a number a method computes beyond the order of float sums: the
meta-gradient is the same in any chunks, and each chunk draws its randomness from a key of its
own first task. Nothing here changes process-wide state: threads are restored after each call,
and the allocator is left alone unless the caller opts in
(:func:`bayesmeta.nets.keep_freed_memory`, which the command line and the suites call).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from bayesmeta.data import TaskBatch
from bayesmeta.inference import posterior
from bayesmeta.inference._checks import NonFiniteLossError, check_int, check_memory
from bayesmeta.inference.distributed import (
    all_reduce_sum,
    any_rank,
    broadcast_,
    chunk_generator,
    gather_objects,
    shard,
    world,
)
from bayesmeta.inference.inner import InnerConfig
from bayesmeta.inference.outer import meta_objective
from bayesmeta.inference.protocol import Learner
from bayesmeta.models import Guide, HierarchicalBNN
from bayesmeta.nets import intra_op_threads, preferred_task_chunk, threads_for
from bayesmeta.nets.memory import activation_bytes

__all__ = [
    "initial_task_chunk",
    "points_per_task",
    "chunk_size",
    "threads_context",
    "check_step_memory",
    "meta_gradient",
    "reduce_meta_gradient",
]


def check_threads(threads: Any) -> int | str | None:
    """The constructor's ``threads``: ``"auto"``, ``None`` or a positive int."""
    if threads not in ("auto", None):
        check_int("threads", threads, alternatives=", 'auto' or None")
    return threads


def initial_task_chunk(task_chunk: Any, net: nn.Module, device: torch.device) -> int | None:
    """The constructor's ``task_chunk``: ``"auto"`` is :func:`preferred_task_chunk` for the
    net and device (and is re-decided per meta-batch, :func:`chunk_size`)."""
    if task_chunk == "auto":
        return preferred_task_chunk(net, device)
    if task_chunk is not None:
        check_int("task_chunk", task_chunk, alternatives=", 'auto' or None")
    return task_chunk


def points_per_task(batch: TaskBatch, inner: InnerConfig) -> int:
    """Network inputs one task of ``batch`` forwards in a meta-step, with its graph kept,
    per particle: every inner step's support set and the queries."""
    S, Q = batch.support_x.shape[1], batch.query_x.shape[1]
    return Q + (inner.steps + 1) * S


def chunk_size(learner: Learner, batch: TaskBatch) -> int:
    """Tasks per backward pass of a meta-step on ``batch``: ``task_chunk``; with ``"auto"``
    also at most what fits the activation-memory budget of
    :func:`bayesmeta.nets.preferred_task_chunk` (the ceiling of the default settings)."""
    T = batch.num_tasks
    if not learner.auto_chunk:
        return min(T, learner.task_chunk or T)
    points = learner.inner.particles * points_per_task(batch, learner.inner)
    return min(T, preferred_task_chunk(learner.model.net, learner.device, points) or T)


def threads_context(
    net: nn.Module, points: int, setting: int | str | None
) -> AbstractContextManager[None]:
    """A context that runs its block on the intra-op threads that ``setting`` chooses for
    work on ``points`` network inputs whose graph is kept (:func:`bayesmeta.nets.threads_for`)."""
    return intra_op_threads(threads_for(net, points, setting))


def check_step_memory(
    model: HierarchicalBNN, guide: Guide, inner: InnerConfig, num_tasks: int, points: int = 0
) -> None:
    """Refuse an inner step on ``num_tasks`` tasks at once whose posterior draws
    (:meth:`~bayesmeta.models.Guide.step_bytes`), with the activations that one task's
    ``points`` inputs per particle keep for backward (a meta-step's), would take more than
    :data:`~bayesmeta.inference.posterior.MEMORY_LIMIT` bytes, before drawing any."""
    P, limit = inner.particles, posterior.MEMORY_LIMIT

    def need(particles: int) -> int:
        draws = guide.step_bytes(model, num_tasks, particles, inner.adapt)
        kept = activation_bytes(model.net, particles * points) if points else None
        return draws + (kept or 0)

    if need(P) <= limit:
        return
    lo, hi = 0, P  # the most particles that fit: need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid)
    tasks = "one task" if num_tasks == 1 else f"{num_tasks} tasks at once"
    adapt = inner.adapt
    weights = sum(w.numel() for n, w in model.prior_loc().items() if adapt is None or n in adapt)
    fix = f"use at most {lo} particles" if lo else "use a smaller network"
    if num_tasks > 1:
        fix += ", or fewer tasks per backward pass (task_chunk) or per call"
    check_memory(
        need(P),
        limit,
        f"particles={P}",
        f"for the {type(guide).__name__}'s draws in one inner step on {tasks} "
        f"({weights} weights per task, {num_tasks} × {P} × {weights} draws at least)"
        + (f" and one task's activations ({P} × {points} inputs)" if points else ""),
        fix,
    )


def meta_gradient(
    learner: Learner, batch: TaskBatch, chunk: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Backpropagate this rank's share of ``batch`` in chunks of ``chunk`` tasks; the
    per-task losses of the share and the outer rule's accumulated direction.

    The chunks give the same meta-gradient, one chunk's graph alive at a time. Each chunk
    draws its randomness from a generator keyed by one draw of ``generator`` and the chunk's
    first task, so chunks that begin at the same tasks draw the same numbers whichever process
    runs them. Inside a ``torch.distributed`` process group every rank takes its share of
    ``batch`` (the same whole meta-batch on every rank, :func:`shard`), and
    :func:`reduce_meta_gradient` sums the ranks' gradients: N processes give θ of one process
    whose chunks begin at the same tasks (e.g. ``task_chunk = T / N``), and for methods
    without random draws (e.g. maml, fomaml, metasgd, anil) of one process with any chunks.
    Raises :class:`NonFiniteLossError` on every rank, with the gradients zeroed, when a task's
    loss is not finite on any rank."""
    rank, size = world()
    T = batch.num_tasks
    if T < size:
        raise ValueError(
            f"the meta-batch has {T} tasks for {size} processes; give every process at "
            f"least one task (meta_batch >= {size})"
        )
    lo, hi = shard(T, rank, size)
    chunk = min(chunk, hi - lo)
    key, device = _step_key(generator), generator.device if generator is not None else "cpu"
    outer, losses, bad, direction = learner.method.outer, [], [], {}
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        part = batch if stop - start == T else batch[start:stop]
        loss_t, state = meta_objective(
            learner.model,
            outer,
            learner.guide,
            part,
            learner.inner,
            learner.lr,
            learner.kl_weight,
            chunk_generator(key, start, device),
        )
        loss_t = loss_t.reshape(-1)  # [T] (a net without a task axis in its loss gives [])
        bad += ((~torch.isfinite(loss_t)).nonzero().flatten() + start).tolist()
        losses.append(loss_t.detach())
        if not bad:  # (a chunk after a bad one is scored, for the message, not learned)
            outer.accumulate(learner.model, loss_t, state, part.num_tasks / T, direction)
    if any_rank(bool(bad), learner.device):
        learner.optimizer.zero_grad(set_to_none=True)
        bad = sorted(i for b in gather_objects(bad) for i in b)
        raise NonFiniteLossError(
            f"meta-step {learner.step}: the meta-loss is not finite for tasks {bad}; "
            f"parameters and optimizer state were left untouched. {divergence_hint(learner)}"
        )
    return torch.cat(losses), direction


def reduce_meta_gradient(
    learner: Learner, losses: torch.Tensor, direction: dict[str, Any]
) -> float:
    """Sum the ranks' losses and gradients (each share carries 1/T per task: the sum is the
    whole meta-gradient), let the outer rule set the gradients the optimizer steps on, add the
    hyperprior's; the mean meta-loss. Raises :class:`NonFiniteLossError`, with the gradients
    zeroed, when a gradient is not finite."""
    loss, count = losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
    params = [p for g in learner.optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    all_reduce_sum([loss, count, *grads, *direction.values()])
    loss = loss / count
    model = learner.model
    if learner.method.outer.finish(model, direction) and model.hyperprior is not None:
        (-learner.hyperprior_weight * model.hyperprior_log_prob()).backward()
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        learner.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"meta-step {learner.step}: a gradient is not finite (loss {loss.item():.4g}); "
            "parameters and optimizer state were left untouched"
        )
    return loss.item()


def divergence_hint(learner: Learner) -> str:
    """What usually makes an inner loop diverge, with this learner's settings."""
    hint = f"If the inner loop diverged, a smaller inner_lr (now {learner.inner_lr:g}) helps"
    guide = learner.guide
    if guide.max_particles is None and not guide.exact and learner.inner.particles == 1:
        # One draw's scale gradient is noisy; natural steps on the means then overshoot
        # (docs/performance.md, "Guides' arithmetic").
        hint += ", as do more posterior draws per step (now particles=1)"
    return hint + "."


def _step_key(generator: torch.Generator | None) -> int:
    """One draw of ``generator`` that keys a meta-step's randomness (the same on every rank:
    the ranks' generators are in step; without one, rank 0's draw is shared)."""
    device = generator.device if generator is not None else "cpu"
    key = torch.randint(2**62, (1,), generator=generator, device=device)
    if generator is None:
        broadcast_([key], "sharing the meta-step's random key")
    return int(key)
