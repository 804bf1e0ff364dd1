"""Argument checks shared by the inference layer: one message shape for every bad option."""

from __future__ import annotations

import math
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
