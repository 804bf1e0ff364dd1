"""How many intra-op threads bayesmeta's own batched kernels run on.

The sinusoid MLP's ops are a few thousand numbers each: torch's thread pool costs more to wake
than the work it shares, and when another process holds a core, its spinning threads wait on a
descheduled peer. With torch's default two threads on this 2-core CPU a sinusoid meta-step of
maml took 2.2 times as long as on one thread while another core was busy, and 11% less time
on an idle machine (``benchmarks/bench_speed.py``; docs/performance.md, "Threads"). A Conv4
meta-step's convolutions are large enough to share. So forwards whose activations are small
run on one thread, and the others on torch's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bayesmeta.nets.memory import activation_bytes

__all__ = ["SMALL_WORK_MB", "threads_for", "intra_op_threads"]

#: A backward pass whose estimated activations (:func:`bayesmeta.nets.memory.activation_bytes`)
#: are below this many MiB runs on one thread: the sinusoid MLP's whole meta-batch (a few MiB),
#: not a Conv4 task (tens of MiB).
SMALL_WORK_MB = 16


def threads_for(net: nn.Module, points: int, setting: int | str | None = "auto") -> int | None:
    """Intra-op threads for work on ``points`` inputs of ``net`` with their graph kept:
    ``setting`` itself when an int, and for ``"auto"`` 1 when the activations are below
    :data:`SMALL_WORK_MB` (``None``, torch's setting, otherwise and for unknown networks)."""
    if setting is None or isinstance(setting, int):
        return setting
    size = activation_bytes(net, points)
    return 1 if size is not None and size < SMALL_WORK_MB * 2**20 else None


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads (``None``: torch's setting), then restore."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
