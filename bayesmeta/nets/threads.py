"""How many intra-op threads bayesmeta's own batched kernels run on.

The sinusoid MLP's ops are a few thousand numbers each: torch's thread pool costs more to wake
than the work it shares, and when another process holds a core, its spinning threads wait on a
descheduled peer: with torch's default threads a sinusoid meta-step runs much longer than on
one thread while another core is busy, and gains little on an idle machine (measured with
``benchmarks/bench_speed.py``; figures in docs/performance.md, "Threads"). A Conv4 meta-step's
convolutions are large enough to share. So forwards whose activations are small
run on one thread, and the others on torch's setting, less the cores that other processes
keep busy at that moment (on Linux): a busy core's share of a convolution would wait for it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from bayesmeta.nets.memory import activation_bytes

__all__ = ["SMALL_WORK_MB", "threads_for", "intra_op_threads", "busy_cores", "usable_cores"]

#: A backward pass whose estimated activations (:func:`bayesmeta.nets.memory.activation_bytes`)
#: are below this many MiB runs on one thread: the sinusoid MLP's whole meta-batch (a few MiB),
#: not a Conv4 task (tens of MiB).
SMALL_WORK_MB = 16


def threads_for(net: nn.Module, points: int, setting: int | str | None = "auto") -> int | None:
    """Intra-op threads for work on ``points`` inputs of ``net`` with their graph kept:
    ``setting`` itself when an int, and for ``"auto"`` 1 when the activations are below
    :data:`SMALL_WORK_MB`, else torch's setting (``None``) less the cores that other
    processes keep busy (:func:`busy_cores`), at least 1."""
    if setting is None or isinstance(setting, int):
        return setting
    size = activation_bytes(net, points)
    if size is not None and size < SMALL_WORK_MB * 2**20:
        return 1
    busy = busy_cores()
    if busy == 0:
        return None
    return min(torch.get_num_threads(), max(1, usable_cores() - busy))


def busy_cores(samples: int = 3) -> int:
    """How many cores other processes are running on now: runnable threads of the machine
    (``/proc/loadavg``) less this process's own (its pool's threads may still spin), the
    least of ``samples`` readings a millisecond apart, so that a passing task is not counted.
    0 where ``/proc`` cannot be read."""
    least = None
    for i in range(samples):
        if i:
            time.sleep(1e-3)
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            own = 0
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, ValueError, IndexError):
            return 0
        others = max(0, running - own)
        least = others if least is None else min(least, others)
    return least or 0


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
