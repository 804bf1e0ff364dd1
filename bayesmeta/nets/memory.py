"""The activation memory a meta-step keeps alive per task, and the task chunk a budget allows.

A meta-step backpropagates through every forward it ran: the inner loop's support-set forwards
(second order keeps all of them) and the query forward, each under ``P`` particles, with the
support set forwarded again as the queries' normalisation context. For a Conv4 the activations
those forwards keep dwarf everything else, and they grow with every task of a backward pass: in
the 8-task chunks that suit the CPU kernel, a meta-step of ``bayesmeta train``'s default
Omniglot learner at 20 ways (1 shot, 15 queries, ``bayes``: P = 4, K = 5) needs gigabytes
(``benchmarks/bench_memory.py``; figures in docs/performance.md, "Task chunks and memory").
:func:`task_chunk_for_memory` instead takes the largest chunk whose estimated activations fit
:data:`TASK_MEMORY_BUDGET_MB`; the meta-gradient does not depend on the chunk.
"""

from __future__ import annotations

import torch
from torch import nn

from bayesmeta.nets.conv4 import Conv4
from bayesmeta.nets.mlp import MLP

__all__ = [
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
#: Tensors a Conv4 block keeps for backward per input point, in units of its conv output's
#: size (the conv, normalisation and ReLU outputs and the pooling's), a little above the
#: measured ratio (docs/performance.md) so that the estimate errs on the safe side.
_CONV4_KEPT = 4.5
#: The same for an MLP layer (its pre-activation, activation and the ELBO's copies).
_MLP_KEPT = 3.0


def activation_bytes(net: nn.Module, points: int) -> int | None:
    """Estimated bytes that ``net``'s forward of ``points`` inputs keeps for backward (``None``
    for a network other than bayesmeta's :class:`Conv4` and :class:`MLP`)."""
    param = next(net.parameters(), None)
    size = param.element_size() if param is not None else 4
    if type(net) is Conv4:
        side, per_point = net.image_size, 0
        for _ in range(4):  # (four blocks, each halving the side by its max-pool)
            per_point += net.hidden * side * side
            side //= 2
        return int(_CONV4_KEPT * size * per_point * points)
    if type(net) is MLP:
        return int(_MLP_KEPT * size * (sum(net.hidden) + net.out_features) * points)
    return None


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
