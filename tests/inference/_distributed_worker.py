"""What each process of tests/inference/test_distributed.py runs (spawned: importable)."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bayesmeta.data import TaskBatch
from bayesmeta.inference import MetaLearner, evaluate
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP

#: Method → learner options (small: every process builds and trains each).
METHODS = {
    "maml": dict(inner_steps=2, inner_lr=0.05),
    "metasgd": dict(inner_steps=2, inner_lr=0.05),
    "bayes": dict(inner_steps=2, inner_lr=0.05, particles=2, eval_particles=3),
    "reptile": dict(inner_steps=3, inner_lr=0.05),
}


class Lines:
    """Noisy lines ``y = a x + b``, float64: a task distribution with a generator."""

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        ab = torch.randn(num_tasks, 1, 2, generator=generator, dtype=torch.float64)
        x = torch.rand(num_tasks, 8, 1, generator=generator, dtype=torch.float64) * 4 - 2
        y = (
            ab[..., :1] * x
            + ab[..., 1:]
            + 0.1 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        )
        return TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


def learner(method: str, task_chunk: int | None = None, init_seed: int = 0) -> MetaLearner:
    """A float64 learner, initialised by ``init_seed`` (under the default dtype, float32)."""
    torch.manual_seed(init_seed)
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5), prior_scale=0.5).double()
    return MetaLearner(model, method, task_chunk=task_chunk, **METHODS[method])


def theta(learner: MetaLearner) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in learner.model.state_dict().items()}
    out.update({f"lr.{i}": p.detach().clone() for i, p in enumerate(learner.lr_params)})
    return out


def _join(rank: int, size: int, rendezvous: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def train(rank: int, size: int, rendezvous: str, out: str, methods, T: int, steps: int) -> None:
    """Meta-train every method (θ initialised differently on every rank: fit shares rank 0's),
    then evaluate; rank 0 saves θ and the scores."""
    _join(rank, size, rendezvous, 60)
    scores = {}
    for method in methods:
        lrn = learner(method, init_seed=rank)
        lrn.fit(Lines(), meta_steps=steps, meta_batch=T, seed=5, progress=False)
        scores[method] = evaluate(lrn, Lines(), num_tasks=7, meta_batch=2, seed=1).to_dict()
        if rank == 0:
            torch.save(theta(lrn), Path(out) / f"{method}.pt")
    if rank == 0:
        (Path(out) / "scores.json").write_text(json.dumps(scores))
    dist.barrier()  # (tear the group down together, not while rank 0 still writes)
    dist.destroy_process_group()
    # gloo's threads can still be joinable when the interpreter tears itself down, and the
    # process then aborts ("terminate called without an active exception") after its work
    # is done and written; leave at once instead, with a clean exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_at_step_2(
    rank: int, size: int, rendezvous: str, out: str, timeout_s: float, how: str
) -> None:
    """Rank 1 dies (``how="die"``) or stops answering (``"hang"``) in the middle of a run; the
    others must fail with RankFailure, not wait forever."""
    _join(rank, size, rendezvous, timeout_s)

    stopped = []

    def callback(lrn, record):
        if lrn.step == 2:
            stopped.append(time.monotonic())
            if rank == 1 and how == "die":
                os._exit(3)
            if rank == 1:
                time.sleep(600)

    try:
        learner("maml").fit(
            Lines(), meta_steps=50, meta_batch=4, seed=0, progress=False, callback=callback
        )
    except Exception as err:
        waited = time.monotonic() - stopped[0]
        (Path(out) / f"rank{rank}.txt").write_text(f"{waited}\n{type(err).__name__}: {err}")
        raise
