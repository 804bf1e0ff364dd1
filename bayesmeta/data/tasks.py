"""Task batches and the task-distribution protocol.

Every tensor carries the task axis first: support inputs ``[T, S, ...]``, query inputs
``[T, Q, ...]``. Classification labels are ``int64`` in ``[0, N)``; regression targets are
floating point ``[T, S, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["TaskBatch", "TaskDistribution"]


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_shapes(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> None:
    """Inputs ``[T, B, ...]``, finite floats of one trailing shape; targets with their inputs'
    ``T`` and ``B``; non-empty task, support and query axes."""
    for name, t in (("support_x", sx), ("query_x", qx)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [T, B, ...], got {tuple(t.shape)}")
        if not torch.is_floating_point(t):
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, found NaN or inf")
    T = sx.shape[0]
    for name, t in (("support_y", sy), ("query_x", qx), ("query_y", qy)):
        if t.dim() < 1 or t.shape[0] != T:
            raise ValueError(
                f"{name} must have the same number of tasks as support_x ({T}), "
                f"got shape {tuple(t.shape)}"
            )
    if T == 0:
        raise ValueError("support_x must hold at least one task, got T=0")
    if sx.shape[1] == 0:
        raise ValueError("support set must be non-empty, got S=0")
    if qx.shape[1] == 0:
        raise ValueError("query set must be non-empty, got Q=0")
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(
            f"support_x and query_x must share their input shape, got "
            f"{tuple(sx.shape[2:])} and {tuple(qx.shape[2:])}"
        )
    for (xn, x), (yn, y) in (
        (("support_x", sx), ("support_y", sy)),
        (("query_x", qx), ("query_y", qy)),
    ):
        if y.dim() < 2 or y.shape[1] != x.shape[1]:
            raise ValueError(
                f"{yn} must have shape [T, {x.shape[1]}, ...] to match {xn}, got {tuple(y.shape)}"
            )


def _check_labels(sy: torch.Tensor, qy: torch.Tensor, num_classes: int | None) -> None:
    """Integer class labels ``[T, B]`` in ``[0, num_classes)`` (``None``: any count)."""
    for name, y in (("support_y", sy), ("query_y", qy)):
        if y.dim() != 2:
            raise ValueError(f"{name} class labels must have shape [T, B], got {tuple(y.shape)}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes}")
    for name, y in (("support_y", sy), ("query_y", qy)):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
            raise ValueError(f"{name} labels must lie in {bound}, found range [{lo}, {hi}]")


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of ``T`` tasks, each with a support and a query set.

    Parameters
    ----------
    support_x : Tensor of shape ``[T, S, ...]``
    support_y : Tensor of shape ``[T, S]`` (int64 class labels) or ``[T, S, D]`` (float targets)
    query_x : Tensor of shape ``[T, Q, ...]`` (same trailing shape as ``support_x``)
    query_y : Tensor of shape ``[T, Q]`` or ``[T, Q, D]`` (same kind as ``support_y``)
    num_classes : int, optional
        ``N`` for classification; labels must then lie in ``[0, N)``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    num_classes: int | None = None

    def __post_init__(self) -> None:
        sx = _check_tensor("support_x", self.support_x)
        sy = _check_tensor("support_y", self.support_y)
        qx = _check_tensor("query_x", self.query_x)
        qy = _check_tensor("query_y", self.query_y)
        _check_shapes(sx, sy, qx, qy)
        if sy.is_floating_point() != qy.is_floating_point():
            raise ValueError(
                f"support_y and query_y must be of the same kind, got {sy.dtype} and {qy.dtype}"
            )
        if sy.is_floating_point():
            if self.num_classes is not None:
                raise ValueError("num_classes is only for integer class labels, got float targets")
            for name, y in (("support_y", sy), ("query_y", qy)):
                if not bool(torch.isfinite(y).all()):
                    raise ValueError(f"{name} must be finite, found NaN or inf")
        else:
            _check_labels(sy, qy, self.num_classes)

    @property
    def num_tasks(self) -> int:
        """``T``, the number of tasks."""
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        return not self.support_y.is_floating_point()

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch with every tensor on ``device``."""
        return TaskBatch(
            self.support_x.to(device),
            self.support_y.to(device),
            self.query_x.to(device),
            self.query_y.to(device),
            self.num_classes,
        )

    def __getitem__(self, index: int | slice | torch.Tensor) -> TaskBatch:
        """Select tasks along the task axis (an int keeps a task axis of size 1)."""
        if isinstance(index, int):
            # An out-of-range int would otherwise give an empty batch and a misleading error.
            if not -self.num_tasks <= index < self.num_tasks:
                raise IndexError(f"task index {index} out of range for {self.num_tasks} tasks")
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            self.num_classes,
        )


@runtime_checkable
class TaskDistribution(Protocol):
    """Anything that samples meta-batches: ``sample(num_tasks, generator=None) -> TaskBatch``.

    The same ``generator`` state gives the same batch; nothing reads Python's global ``random``.
    """

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch: ...
