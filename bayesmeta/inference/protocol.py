"""What the training loop, evaluation and the file format ask of a learner.

:class:`~bayesmeta.inference.MetaLearner` is one; these protocols let
:func:`~bayesmeta.inference.training.fit`, :func:`~bayesmeta.inference.evaluate` and
:mod:`~bayesmeta.inference.serialization` name its type without importing it (the learner
imports them), and let a learner of the user's own be evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from bayesmeta.data import TaskBatch
from bayesmeta.inference.inner import InnerConfig
from bayesmeta.inference.methods import Method
from bayesmeta.inference.posterior import TaskPosterior
from bayesmeta.models import Guide, HierarchicalBNN

__all__ = ["Adapts", "Learner"]


class Adapts(Protocol):
    """What :func:`~bayesmeta.inference.evaluate` needs: ``adapt`` and a device (a learner
    may also offer ``eval_particles`` and ``threads_context``, which evaluation then uses)."""

    device: torch.device

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> TaskPosterior: ...


class Learner(Adapts, Protocol):
    """A meta-learner as the training loop and the file format see it: its model, guide,
    method and inner loop, its settings, optimizer and counters, and ``meta_step``."""

    model: HierarchicalBNN
    guide: Guide
    method: Method
    inner: InnerConfig
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    lr_params: nn.ParameterList
    inner_lr: float
    meta_lr: float
    kl_weight: float
    hyperprior_weight: float
    eval_particles: int
    test_inner_steps: int
    task_chunk: int | None
    auto_chunk: bool
    threads: int | str | None
    step: int
    skipped_steps: int
    history: list[dict[str, float]]

    @property
    def lr(self) -> float | Mapping[str, torch.Tensor]: ...

    def config(self) -> dict[str, Any]: ...

    def meta_step(self, batch: TaskBatch, generator: torch.Generator | None = None) -> float: ...

    def threads_context(self, points: int) -> AbstractContextManager[None]: ...
