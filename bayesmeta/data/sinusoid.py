"""Sinusoid regression tasks (Finn et al. 2017, "Model-Agnostic Meta-Learning").

Each task is a function ``y = A sin(x - phi)`` with amplitude ``A``, phase ``phi`` and inputs ``x``
drawn uniformly from their ranges; the defaults are the ranges of the MAML paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bayesmeta.data._common import check_count, resolve_generator
from bayesmeta.data.tasks import TaskBatch

__all__ = ["Sinusoid", "SinusoidParams"]


@dataclass(frozen=True, eq=False)
class SinusoidParams:
    """The true functions of a batch of sinusoid tasks.

    Parameters
    ----------
    amplitude : Tensor of shape ``[T]``
    phase : Tensor of shape ``[T]``
    """

    amplitude: torch.Tensor
    phase: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free targets ``A_t sin(x - phi_t)``.

        Parameters
        ----------
        x : Tensor of shape ``[T, B, 1]``

        Returns
        -------
        Tensor of shape ``[T, B, 1]``
        """
        if x.dim() != 3 or x.shape[0] != self.amplitude.shape[0]:
            raise ValueError(
                f"x must have shape [T={self.amplitude.shape[0]}, B, 1], got {tuple(x.shape)}"
            )
        amplitude = self.amplitude.to(x)[:, None, None]
        phase = self.phase.to(x)[:, None, None]
        return amplitude * torch.sin(x - phase)


def _check_range(name: str, value: object) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{name} must be finite with low <= high, got ({low}, {high})")
    return low, high


def _uniform(
    shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    low, high = bounds
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return low + (high - low) * u


class Sinusoid:
    """Sinusoid regression: ``y = A sin(x - phi) + noise * eps`` with ``eps ~ Normal(0, 1)``.

    Parameters
    ----------
    shots : int
        ``S``, support points per task.
    queries : int
        ``Q``, query points per task.
    amplitude, phase, x_range : (float, float)
        Uniform ranges of ``A``, ``phi`` and ``x`` (defaults: Finn et al. 2017).
    noise : float
        Standard deviation of the Gaussian observation noise on support and query targets.

    Notes
    -----
    ``sample`` draws, in this order, ``A [T]``, ``phi [T]``, ``x [T, S + Q, 1]`` and (only when
    ``noise > 0``) ``eps [T, S + Q, 1]`` from one generator; the first ``S`` points of each task
    are its support set. Tensors are float32 (whatever the default dtype) and created on the
    generator's device.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise: float = 0.0,
    ) -> None:
        self.shots = check_count("shots", shots)
        self.queries = check_count("queries", queries)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)

    def __repr__(self) -> str:
        return (
            f"Sinusoid(shots={self.shots}, queries={self.queries}, amplitude={self.amplitude}, "
            f"phase={self.phase}, x_range={self.x_range}, noise={self.noise})"
        )

    def sample(
        self,
        num_tasks: int,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, SinusoidParams]:
        """Draw ``T`` tasks.

        Parameters
        ----------
        num_tasks : int
            ``T``.
        generator : torch.Generator, optional
            Source of all randomness; ``None`` uses ``torch.default_generator`` (the global CPU
            generator, seeded by ``torch.manual_seed``).
        return_params : bool
            Also return the tasks' :class:`SinusoidParams`.

        Returns
        -------
        TaskBatch
            float32 ``support_x``, ``support_y`` of shape ``[T, S, 1]`` and ``query_x``,
            ``query_y`` of shape ``[T, Q, 1]``.
        SinusoidParams
            Only with ``return_params=True``: amplitudes and phases, each ``[T]``.
        """
        T = check_count("num_tasks", num_tasks)
        g = resolve_generator(generator)
        S, Q = self.shots, self.queries
        params = SinusoidParams(
            amplitude=_uniform((T,), self.amplitude, g),
            phase=_uniform((T,), self.phase, g),
        )
        x = _uniform((T, S + Q, 1), self.x_range, g)
        y = params(x)
        if self.noise > 0:
            y = y + self.noise * torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
        batch = TaskBatch(x[:, :S], y[:, :S], x[:, S:], y[:, S:])
        return (batch, params) if return_params else batch
