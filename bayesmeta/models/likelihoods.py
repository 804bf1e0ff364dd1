"""Observation models p(y | f(x; w)) for the hierarchical BNN.

Network outputs ``f`` carry the leading axes of the weights they came from, ``[*lead, T, B, O]``
with ``lead`` empty or ``(P,)``; targets carry the task axis first, ``[T, B]`` (class labels) or
``[T, B, D]`` (real targets).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["Likelihood", "Categorical", "Normal"]


class Likelihood(nn.Module):
    """Base class: a likelihood knows its Pyro distribution and its pointwise log density."""

    #: ``"classification"`` or ``"regression"``
    kind: str = ""

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        """Pyro distribution with batch shape ``[*lead, T, B]`` for outputs ``f``."""
        raise NotImplementedError

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y | f)`` of shape ``[*lead, T, B]``."""
        raise NotImplementedError

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        """Raise ``ValueError`` when targets ``y`` cannot be scored against ``out_features``."""
        raise NotImplementedError

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor | None:
        """Diagonal of the Fisher information of ``p(y | f)`` in ``f``, shaped like ``f``
        (the Gauss-Newton curvature per output); ``None`` where it is not written out."""
        return None


class Categorical(Likelihood):
    """``y ~ Categorical(logits=f)`` for ``N``-way classification; ``f`` is ``[..., B, N]``."""

    kind = "classification"

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=f)

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(f, -1)
        return p * (1 - p)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(f, dim=-1)
        index = y.expand(logp.shape[:-1]).unsqueeze(-1)
        return logp.gather(-1, index).squeeze(-1)

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(
                f"{name}: the Categorical likelihood expects integer class labels [T, B], "
                f"got dtype {y.dtype}; use Normal() for real-valued targets"
            )
        if y.dim() != 2:
            raise ValueError(f"{name}: class labels must have shape [T, B], got {tuple(y.shape)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out_features:
            raise ValueError(
                f"{name}: labels must lie in [0, {out_features}) to match the network's "
                f"{out_features} outputs, found range [{lo}, {hi}]"
            )


class Normal(Likelihood):
    """``y ~ Normal(f, noise)`` with ``y`` of shape ``[T, B, D]``.

    Parameters
    ----------
    noise : float
        Observation standard deviation (its initial value when learned).
    learn_noise : bool
        Meta-learn ``log(noise)`` as one of the global parameters θ.
    """

    kind = "regression"

    def __init__(self, noise: float = 1.0, learn_noise: bool = False):
        super().__init__()
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0):
            raise ValueError(f"noise must be a positive finite float, got {noise!r}")
        self.learn_noise = bool(learn_noise)
        log_noise = torch.tensor(math.log(noise))
        if self.learn_noise:
            self.log_noise = nn.Parameter(log_noise)
        else:
            self.register_buffer("log_noise", log_noise)

    @property
    def noise(self) -> torch.Tensor:
        return self.log_noise.exp()

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        return (-2 * self.log_noise).exp().to(f.dtype).expand_as(f)

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(f, self.noise.to(f.dtype)).to_event(1)

    def log_prob(
        self, f: torch.Tensor, y: torch.Tensor, output_var: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pointwise ``log p(y | f)`` ``[*lead, T, B]``; with ``output_var`` (the variance of a
        Gaussian ``f``, broadcastable to it) the marginal ``log N(y; f, noise² + output_var)``."""
        noise = self.noise.to(f.dtype)
        if output_var is not None:
            var = noise.square() + output_var
            z2 = (y - f).square() / var
            return (-0.5 * (z2 + var.log() + math.log(2 * math.pi))).sum(-1)
        z = (y - f) / noise
        return (-0.5 * z.square() - noise.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if not y.is_floating_point():
            raise ValueError(
                f"{name}: the Normal likelihood expects real targets [T, B, D], got dtype "
                f"{y.dtype}; use Categorical() for class labels"
            )
        if y.dim() != 3 or y.shape[-1] != out_features:
            raise ValueError(
                f"{name}: targets must have shape [T, B, {out_features}] to match the network's "
                f"outputs, got {tuple(y.shape)}"
            )

    def extra_repr(self) -> str:
        return f"noise={float(self.noise.detach()):.4g}, learn_noise={self.learn_noise}"
