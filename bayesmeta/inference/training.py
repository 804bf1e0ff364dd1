"""The training loop: :func:`fit` meta-trains a :class:`~bayesmeta.inference.MetaLearner`.

The learner is the algorithm (adapt, meta-step, save); the loop around it lives here: the
outer step-size schedule, validation, the progress bar, callbacks, checkpoints and resuming
them, non-finite steps, and what rank 0 alone does in a ``torch.distributed`` run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesmeta.data import TaskBatch, TaskDistribution
from bayesmeta.inference import serialization
from bayesmeta.inference._checks import NonFiniteLossError, check_int, check_seed
from bayesmeta.inference.checkpoint import save_checkpoint, writable_folder
from bayesmeta.inference.distributed import broadcast_, world
from bayesmeta.inference.evaluate import evaluate
from bayesmeta.inference.protocol import Learner

__all__ = ["fit", "LR_SCHEDULES", "CHECKPOINT_NAME"]

#: Outer step-size schedules of :func:`fit`: the factor on ``meta_lr`` at step ``s``
#: (from 0) of ``n``. Cosine never reaches 0 at a step that runs (its last is ``s = n - 1``).
LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda s, n: 1.0,
    "cosine": lambda s, n: 0.5 * (1.0 + math.cos(math.pi * s / n)),
}

CHECKPOINT_NAME = "checkpoint.pt"


def fit(
    learner: Learner,
    tasks: TaskDistribution,
    meta_steps: int,
    meta_batch: int = 32,
    *,
    val_tasks: TaskDistribution | None = None,
    val_every: int = 100,
    val_num_tasks: int = 100,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    skip_nonfinite: bool = False,
    callback: Callable[[Learner, dict[str, float]], None] | None = None,
    lr_schedule: str = "constant",
) -> list[dict[str, float]]:
    """Meta-train θ for ``meta_steps`` outer steps (in all, counting resumed ones).

    Inside an initialised ``torch.distributed`` process group (e.g. under ``torchrun``)
    every rank trains its share of each meta-batch
    (:meth:`~bayesmeta.inference.MetaLearner.meta_step`) from rank 0's θ, validation is sharded
    too, and rank 0 alone writes checkpoints and shows progress; every rank calls ``callback``.
    See docs/distributed.md.

    Parameters
    ----------
    tasks : TaskDistribution with ``sample(T, generator) -> TaskBatch``
    meta_batch : T, tasks per outer step
    val_tasks : validated every ``val_every`` steps on ``val_num_tasks`` fixed tasks
    checkpoint_dir : write ``checkpoint.pt`` there every ``checkpoint_every`` steps and at
        the end (created, and checked to be writable, before the first step); with
        ``resume`` a run finds its checkpoint and continues bit for bit, if the checkpoint
        was written by the same method, model and settings (else ``ValueError`` naming
        every difference)
    seed : int, seeds the task sampler and the inner-loop noise
    skip_nonfinite : skip (and count in ``skipped_steps``) steps whose loss is not finite
        instead of raising
    callback : called as ``callback(learner, record)`` after every step
    lr_schedule : ``"constant"`` or ``"cosine"``: the outer step size of step ``s`` is
        ``meta_lr`` times ``LR_SCHEDULES[lr_schedule](s, meta_steps)`` (Reptile's ε too, as
        Nichol et al. anneal it). Set from the step count alone, so a resumed run continues
        on the same curve.

    Returns
    -------
    The history: one dict per step (``step``, ``loss``, ``val_*`` when validated).
    """
    counts = dict(meta_steps=meta_steps, meta_batch=meta_batch, val_every=val_every)
    counts.update(val_num_tasks=val_num_tasks, checkpoint_every=checkpoint_every, seed=seed)
    schedule = _checked_schedule(tasks, lr_schedule, counts)
    rank, size = world()
    if meta_batch < size:
        raise ValueError(
            f"meta_batch must be at least the number of processes ({size}), got {meta_batch}"
        )
    # Every rank seeds the same generator: each draws the whole meta-batch and keeps its
    # share (meta_step), so the ranks stay in step with one process.
    generator = torch.Generator().manual_seed(seed)
    ckpt = _checkpoint_path(checkpoint_dir, rank)
    run = _run_keys(seed, meta_batch, lr_schedule, meta_steps)
    if ckpt is not None and resume and ckpt.is_file():
        serialization.resume(learner, ckpt, run, generator)
    # One θ for all: rank 0's (models built apart may have been initialised apart).
    broadcast_([*learner.model.state_dict().values(), *learner.lr_params])
    first = True
    bar = tqdm(total=meta_steps, initial=learner.step, disable=not progress or rank != 0,
               desc=learner.method.name)  # fmt: skip
    try:
        while learner.step < meta_steps:
            batch = tasks.sample(meta_batch, generator=generator).to(learner.device)
            if first:  # the task distribution's targets, checked once against the model
                _check_targets(learner, batch)
                first = False
            for group in learner.optimizer.param_groups:
                group["lr"] = learner.meta_lr * schedule(learner.step, meta_steps)
            record = _timed_step(learner, batch, generator, skip_nonfinite)
            last = learner.step == meta_steps
            if val_tasks is not None and (learner.step % val_every == 0 or last):
                metrics = evaluate(learner, val_tasks, num_tasks=val_num_tasks, seed=seed + 1)
                record.update({f"val_{k}": v for k, v in metrics.items() if "ci" not in k})
            learner.history.append(record)
            _show(bar, record)
            if ckpt is not None and rank == 0 and (learner.step % checkpoint_every == 0 or last):
                save_checkpoint(ckpt, serialization.payload(learner, run, generator))
            if callback is not None:
                callback(learner, record)
    finally:
        bar.close()
    return learner.history


def _checked_schedule(tasks: Any, lr_schedule: str, counts: dict[str, int]) -> Callable:
    """The step-size schedule ``lr_schedule`` names, once ``tasks`` can be sampled and every
    count (and the seed) is an int in range; else a ``TypeError`` or ``ValueError``."""
    for name, value in counts.items():
        (check_seed if name == "seed" else check_int)(name, value)
    if not hasattr(tasks, "sample"):
        raise TypeError(f"tasks must have .sample(num_tasks, generator), got {type(tasks)}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, got {lr_schedule!r}")
    return LR_SCHEDULES[lr_schedule]


def _run_keys(seed: int, meta_batch: int, lr_schedule: str, meta_steps: int) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must repeat."""
    run: dict[str, Any] = {"seed": seed, "meta_batch": meta_batch}
    if lr_schedule != "constant":  # (constant runs keep the keys older checkpoints hold)
        run.update(lr_schedule=lr_schedule, meta_steps=meta_steps)
    return run


def _checkpoint_path(checkpoint_dir: str | Path | None, rank: int) -> Path | None:
    """Where the run's checkpoint goes. A folder that cannot take one fails now, not after
    checkpoint_every steps. Rank 0 alone writes; every rank reads the checkpoint to resume (a
    shared folder)."""
    if checkpoint_dir is None:
        return None
    folder = writable_folder(checkpoint_dir) if rank == 0 else Path(checkpoint_dir)
    return folder / CHECKPOINT_NAME


def _check_targets(learner: Learner, batch: TaskBatch) -> None:
    out = learner.model.out_features(batch.support_x)
    learner.model.likelihood.check_targets(batch.support_y, out, "support_y")
    learner.model.likelihood.check_targets(batch.query_y, out, "query_y")


def _timed_step(
    learner: Learner, batch: TaskBatch, generator: torch.Generator, skip_nonfinite: bool
) -> dict[str, float]:
    """One meta-step and its history record; a non-finite step is skipped (counted in
    ``skipped_steps``, its loss NaN) when ``skip_nonfinite``, else raised."""
    start = time.perf_counter()
    try:
        loss = learner.meta_step(batch, generator)
    except NonFiniteLossError:
        if not skip_nonfinite:
            raise
        learner.skipped_steps += 1
        learner.step += 1
        loss = float("nan")
    return {"step": learner.step, "loss": loss, "seconds": time.perf_counter() - start}


def _show(bar: tqdm, record: dict[str, float]) -> None:
    """Advance the progress bar by one step, showing the loss and any validation score."""
    bar.update(1)
    shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "val_mse")}
    if "val_accuracy" in record:  # printed for people: a percentage, as everywhere
        shown["val_accuracy"] = f"{100 * record['val_accuracy']:.1f}%"
    bar.set_postfix(shown)
