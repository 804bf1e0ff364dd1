"""Data-parallel meta-training and evaluation over ``torch.distributed``.

MAML's double backward does not run under ``DistributedDataParallel``, so the meta-batch is
sharded by hand: every process (rank) draws the *whole* meta-batch from the same seeded task
sampler, keeps its contiguous share (:func:`shard`), runs the one inner loop on it, and the
ranks sum their meta-gradients (:func:`all_reduce_sum`). Each task's loss carries the weight
``1 / T`` of the whole meta-batch, so the sum is the full meta-gradient however unevenly ``T``
divides. Drawing the whole batch on every rank keeps the ranks' generators in step with one
process's, which is what makes a run on N processes reproduce a run on one.

The randomness of a meta-step (posterior draws, Reptile's mini-batches) is keyed by the
position of each chunk of tasks in the meta-batch (:func:`chunk_generator`), not by the order
in which a process meets the chunks; see :meth:`~bayesmeta.inference.MetaLearner.meta_step`.

Nothing here starts a process group: ``torchrun`` (or the user) does, and
:func:`init_from_environment` joins the one ``torchrun`` describes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "RankFailure",
    "world",
    "shard",
    "all_reduce_sum",
    "broadcast_",
    "gather_objects",
    "any_rank",
    "chunk_generator",
    "share_from_rank0",
    "local_device",
    "init_from_environment",
    "DEFAULT_TIMEOUT_S",
]

#: Seconds a collective waits for the other ranks before the run fails (not hangs).
DEFAULT_TIMEOUT_S = 300.0


class RankFailure(RuntimeError):
    """Another process of the group stopped or did not answer within the timeout."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """The ``[start, stop)`` of ``rank``'s share of ``n`` items split over ``size`` ranks:
    contiguous, in rank order, sizes differing by at most one (the first ``n % size`` ranks
    take one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _collective(what: str, fn, *args, **kwargs):
    """Run a collective, turning a dead or silent peer into one clear error."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as e:
        rank, size = world()
        raise RankFailure(
            f"rank {rank} of {size}: {what} failed, so another process of the group stopped or "
            f"did not answer within the timeout ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str = "summing gradients") -> None:
    """Sum ``tensors`` over the ranks, in place (one flat buffer per dtype, one call each)."""
    if world()[1] == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        _collective(what, dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view_as(t))


def broadcast_(tensors: Sequence[torch.Tensor], what: str = "sharing θ") -> None:
    """Overwrite ``tensors`` on every rank with rank 0's, in place."""
    if world()[1] == 1:
        return
    for t in tensors:
        _collective(what, dist.broadcast, t.data, src=0)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on any rank (every rank must ask together)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    _collective("checking the loss", dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object, what: str = "gathering results") -> list[object]:
    """Every rank's ``obj``, in rank order (on every rank). Only for this package's own
    results between its own processes: they travel pickled."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: list[object] = [None] * size
    _collective(what, dist.all_gather_object, out, obj)
    return out


def share_from_rank0(obj: object, what: str = "waiting for rank 0") -> object:
    """Rank 0's ``obj`` on every rank (the others pass anything). Only for this package's own
    messages between its own processes: they travel pickled."""
    if world()[1] == 1:
        return obj
    box = [obj]
    _collective(what, dist.broadcast_object_list, box, src=0)
    return box[0]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


def chunk_generator(key: int, start: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the chunk of tasks that begins at task ``start`` of a meta-batch whose
    randomness is keyed by ``key``."""
    return torch.Generator(device=device).manual_seed(_mix(key, start))


def local_device(device: str | None) -> str | None:
    """This process's device: under ``torchrun`` with CUDA, ``cuda`` (or no choice) means the
    GPU of its local rank."""
    if world()[1] > 1 and torch.cuda.is_available() and device in (None, "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def init_from_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when CUDA is there, gloo
    otherwise. ``True`` when this process is one of several; ``False`` (and nothing done) for
    a single process or a group already initialised."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} asks for {size} processes, but this torch was "
                           "built without torch.distributed")  # fmt: skip
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True
