"""The activation memory a meta-step keeps alive per task, and the task chunk a budget allows.

A meta-step backpropagates through every forward it ran: the inner loop's support-set forwards
(second order keeps all of them) and the query forward, each under ``P`` particles, with the
support set forwarded again as the queries' normalisation context. For a Conv4 the activations
those forwards keep dwarf everything else, and they grow with every task of a backward pass: in
chunks of 8 tasks, a meta-step of ``bayesmeta train``'s default Omniglot learner at 20 ways
(1 shot, 15 queries, ``bayes``: P = 4, K = 5) needs gigabytes (``benchmarks/bench_memory.py``;
figures in docs/performance.md, "Task chunks and memory"). :func:`task_chunk_for_memory` takes
the largest chunk whose estimated activations fit :data:`TASK_MEMORY_BUDGET_MB`, and
:func:`keep_freed_memory` lets the allocator reuse what one chunk frees for the next; the
meta-gradient does not depend on the chunk.
"""

from __future__ import annotations

import ctypes
import platform
import sys

import torch
from torch import nn

from bayesmeta.nets.backbone import own_kernels

__all__ = [
    "keep_freed_memory",
    "freed_memory_kept",
    "TASK_MEMORY_BUDGET_MB",
    "CUDA_MEMORY_SHARE",
    "activation_bytes",
    "task_chunk_for_memory",
]

#: The memory ceiling of the default settings off CUDA: the activations that one backward pass
#: of a meta-step may keep alive, in MiB. With it the default 20-way Omniglot learner above
#: backpropagates 2 tasks at a time, and a meta-step on a meta-batch of 32 needs a fraction of
#: the memory of 8-task chunks, and less time too, since fresh memory costs page faults
#: (docs/performance.md). 5-way tasks keep the CPU kernel's 8 tasks per pass.
TASK_MEMORY_BUDGET_MB = 2048
#: On CUDA: the share of the device's memory that one backward pass may take.
CUDA_MEMORY_SHARE = 0.25


def activation_bytes(net: nn.Module, points: int) -> int | None:
    """Estimated bytes that ``net``'s forward of ``points`` inputs keeps for backward (``None``
    for a network that is not a :class:`~bayesmeta.nets.backbone.Backbone`)."""
    own = own_kernels(net)
    return None if own is None else own.activation_bytes(points)


def task_chunk_for_memory(
    net: nn.Module,
    device: torch.device | str,
    points_per_task: int,
    budget_mb: float | None = None,
) -> int | None:
    """The most tasks whose activations fit the memory budget in one backward pass.

    Parameters
    ----------
    net : the backbone
    device : where the activations live
    points_per_task : inputs forwarded per task with their graph kept, e.g.
        ``P · (Q + (K + 1) · S)`` for ``P`` particles, ``K`` inner steps, ``S`` support and
        ``Q`` query points
    budget_mb : MiB (default :data:`TASK_MEMORY_BUDGET_MB` off CUDA,
        :data:`CUDA_MEMORY_SHARE` of the device's memory on CUDA)

    Returns
    -------
    int >= 1, or ``None`` when the net's activations cannot be estimated.
    """
    per_task = activation_bytes(net, points_per_task)
    if not per_task:
        return None
    device = torch.device(device)
    if budget_mb is not None:
        budget = budget_mb * 2**20
    elif device.type == "cuda":
        budget = CUDA_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = TASK_MEMORY_BUDGET_MB * 2**20
    return max(1, int(budget // per_task))


#: glibc's ``mallopt`` options, and the values :func:`keep_freed_memory` gives them: keep up
#: to 1 GiB of freed memory at the top of the heap, and serve blocks of up to 32 MiB (glibc's
#: ceiling on 64-bit) from the heap instead of from mappings of their own.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_BYTES, _MMAP_BYTES = 1 << 30, 32 << 20
_kept = False


def keep_freed_memory() -> bool:
    """Ask the C allocator to keep freed memory for reuse; whether it does (once per process).

    A CPU meta-step frees its activations after every backward pass and allocates as much
    again for the next chunk of tasks. glibc's malloc hands large freed blocks back to the
    kernel (each block above 128 KiB is a mapping of its own, and the heap's free top is
    trimmed), so every chunk faults its memory in afresh: a Conv4 meta-step backpropagating
    one task at a time is slower than one of eight tasks. With freed memory kept, one task at
    a time is as fast as eight, at a fraction of the peak (figures in docs/performance.md,
    "Task chunks and memory"), which is why a learner with ``task_chunk="auto"`` off CUDA
    calls this.

    It changes the allocator of the whole process, as glibc's ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_`` environment variables would: freed memory goes back to the
    system later; the peak does not grow. Off glibc (macOS, Windows, musl) it changes
    nothing and returns ``False``.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    )
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _kept
