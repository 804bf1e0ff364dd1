"""Argument checks shared by the inference layer: one message shape for every bad option."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int = 1, alternatives: str = "") -> int:
    """``value`` if it is an int ≥ ``minimum`` (bools refused), else ``ValueError``;
    ``alternatives`` names the other values the caller accepts, for the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{alternatives}, got {value!r}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and >= 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative float, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_seed(name: str, value: Any) -> int:
    """``value`` if it is an int (bools refused), else ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return value


def check_device(name: str, device: Any) -> torch.device:
    """``device`` as a :class:`torch.device` if this machine can allocate on it, else
    ``ValueError`` naming ``name`` (``cuda`` without a GPU, ``cuda:7`` on a one-GPU machine,
    ``tpu9``), before any tensor is moved there."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"{name} {device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1, mps): "
            f"{str(err).splitlines()[0]}"
        ) from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{name} {device!r} is not available on this machine: it has no CUDA GPU "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"{name} {device!r} is not available on this machine: it has {count} CUDA "
                f"GPU{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})"
            )
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as err:  # AssertionError: torch built without CUDA
        raise ValueError(
            f"{name} {device!r} is not available on this machine: {str(err).splitlines()[0]}"
        ) from err
    return parsed


def check_inputs(name: str, x: Any, dtype: torch.dtype) -> torch.Tensor:
    """Inputs ``[T, B, ...]`` with at least one task and one point, finite, as ``dtype``.

    Floating inputs of another precision (e.g. float64 for a float32 model) are converted to
    the model's ``dtype`` on purpose: that is what the user means, and torch would refuse the
    mix deep inside a layer. Integer inputs (e.g. uint8 pixels) are refused rather than
    converted, since their scale (0..255 or 0..1) cannot be guessed.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor [T, B, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [T, B, ...], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one task (T >= 1), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(
            f"{name} must hold at least one point per task (B >= 1), got shape {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name} must be floating point (the model's {dtype}), got {x.dtype}; scale "
            "integer inputs yourself (e.g. pixels / 255)"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, found {_count_bad(x)} NaN or inf values")
    return x.to(dtype)


def check_targets(name: str, y: Any, dtype: torch.dtype) -> torch.Tensor:
    """Targets ``[T, B, ...]``: labels as they are, real targets finite and as ``dtype``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor [T, B, ...], got {type(y).__name__}")
    if torch.is_floating_point(y):
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{name} must be finite, found {_count_bad(y)} NaN or inf values")
        return y.to(dtype)
    return y


def check_support(
    model: Any, support_x: Any, support_y: Any, device: torch.device, scored: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support sets checked up front (finite, ``T, S >= 1``, agreeing shapes, and, when
    ``scored``, targets ``model``'s likelihood can score), as the model's dtype on ``device``:
    the one check of a learner's ``adapt`` and ``adapt_differentiable``."""
    dtype = model.prior_loc()[model.names[0]].dtype
    support_x = check_inputs("support_x", support_x, dtype)
    support_y = check_targets("support_y", support_y, dtype)
    if support_y.dim() < 2 or support_x.shape[:2] != support_y.shape[:2]:
        raise ValueError(
            f"support_x [T, S, ...] and support_y [T, S, ...] must agree on T and S, got "
            f"{tuple(support_x.shape)} and {tuple(support_y.shape)}"
        )
    x, y = support_x.to(device), support_y.to(device)
    if scored:
        model.likelihood.check_targets(y, model.out_features(x), "support_y")
    return x, y


def check_memory(nbytes: int, limit: int, request: str, detail: str, fix: str) -> None:
    """``ValueError`` when ``request`` (e.g. ``"particles=100"``) would take ``nbytes`` bytes,
    more than ``limit`` (:data:`bayesmeta.inference.posterior.MEMORY_LIMIT`): the message says
    how much and for what (``detail``), the limit, and ``fix``."""
    if nbytes <= limit:
        return
    raise ValueError(
        f"{request} would take about {_gib(nbytes)} {detail}, over the limit of {_gib(limit)} "
        f"(bayesmeta.inference.posterior.MEMORY_LIMIT); {fix}"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_log_prob(likelihood: object, log_prob: Any, f: torch.Tensor) -> torch.Tensor:
    """``log_prob``, what ``likelihood.log_prob`` returned at outputs ``f [*lead, T, B, O]``,
    if it is a Tensor ``[*lead, T, B]`` (one log density per point), else ``ValueError`` naming
    the likelihood's class, the shape expected and the shape found: a per-task ``[*lead, T]``
    or a kept event axis ``[*lead, T, B, D]`` would broadcast into wrong losses, a scalar fail
    far from its cause."""
    expected = tuple(f.shape[:-1])
    if isinstance(log_prob, torch.Tensor) and tuple(log_prob.shape) == expected:
        return log_prob
    found = tuple(log_prob.shape) if isinstance(log_prob, torch.Tensor) else type(log_prob).__name__
    raise ValueError(
        f"{type(likelihood).__name__}.log_prob(f, y) must return one log density per point, "
        f"shape [*lead, T, B] = {expected} for outputs f of shape {tuple(f.shape)}, got "
        f"{found}; sum over the event axis (e.g. .sum(-1)) but not over points or tasks"
    )


def _count_bad(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


def callable_name(fn: Callable) -> str:
    """A function's name for messages and saved files (a callable object's class name)."""
    return getattr(fn, "__qualname__", type(fn).__name__)


class FiniteWatch:
    """A user's ``inner_loss`` that also notes which of the ``T`` tasks it gave a non-finite
    value: one ``isfinite`` on its ``[P, T]`` or ``[T]`` output per inner step, read once
    after the adaptation (:meth:`check`). An output of another shape is left to the inner
    loop's own error."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], T: int):
        self.loss, self.num_tasks, self.bad = loss, T, None

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = self.loss(outputs, y)
        if isinstance(value, torch.Tensor) and value.dim() in (1, 2):
            if value.shape[-1] == self.num_tasks:
                bad = ~torch.isfinite(value.detach()).reshape(-1, self.num_tasks).all(0)
                self.bad = bad if self.bad is None else self.bad | bad
        return value

    def check(self) -> None:
        """``ValueError`` naming the tasks whose inner loss was not finite at some step."""
        if self.bad is None or not bool(self.bad.any()):
            return
        tasks = self.bad.nonzero().flatten().tolist()
        raise ValueError(
            f"inner_loss {callable_name(self.loss)!r} was not finite (NaN or inf) for tasks "
            f"{tasks} of {self.num_tasks} while adapting to their support sets, so their "
            "posteriors and predictions would be NaN; make inner_loss(outputs, y) finite there "
            "(e.g. a log of 0 or a division by 0 in it)"
        )


class NonFiniteLossError(FloatingPointError):
    """A meta-step produced a non-finite loss or gradient; θ and the optimizer were untouched."""
