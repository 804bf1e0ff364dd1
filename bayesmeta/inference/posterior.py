"""Adapted task posteriors and their predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bayesmeta.models import Guide, HierarchicalBNN, State
from bayesmeta.models.draws import categorical, standard_normal
from bayesmeta.nets import batched_forward

__all__ = ["TaskPosterior", "Prediction"]


@dataclass
class Prediction:
    """Posterior predictive of a meta-batch at query inputs.

    Attributes
    ----------
    outputs : Tensor ``[P, T, Q, O]``
        Network outputs per posterior particle (logits, or regression means).
    kind : ``"classification"`` or ``"regression"``
    noise : Tensor, scalar
        Observation noise (regression only).
    """

    outputs: torch.Tensor
    kind: str
    noise: torch.Tensor | None = None

    # classification ----------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        """Predictive class probabilities ``[T, Q, N]`` (mean over particles)."""
        self._need("classification", "probs")
        return torch.softmax(self.outputs, -1).mean(0)

    # regression --------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean ``[T, Q, D]``; for classification, ``probs``."""
        return self.probs if self.kind == "classification" else self.outputs.mean(0)

    @property
    def stddev(self) -> torch.Tensor:
        """Predictive standard deviation ``[T, Q, D]``: noise and spread over particles."""
        self._need("regression", "stddev")
        spread = self.outputs.var(0, unbiased=False)
        return (spread + self.noise.square()).sqrt()

    def quantile(self, q: float | torch.Tensor) -> torch.Tensor:
        """Quantile of the predictive mixture ``(1/P) Σ_p Normal(f_p, noise)``, ``[T, Q, D]``.

        Found by bisection on the mixture's CDF (exact to ~1e-6 of the predictive spread).
        """
        self._need("regression", "quantile")
        q = torch.as_tensor(q, dtype=self.outputs.dtype, device=self.outputs.device)
        if bool(((q <= 0) | (q >= 1)).any()):
            raise ValueError(f"q must lie in (0, 1), got {q.tolist()}")
        normal = torch.distributions.Normal(self.outputs, self.noise)
        width = 8 * self.stddev + 8 * (self.outputs.max(0).values - self.outputs.min(0).values)
        lo, hi = self.mean - width, self.mean + width
        for _ in range(50):
            mid = (lo + hi) / 2
            below = normal.cdf(mid.unsqueeze(0)).mean(0) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    # both --------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``y`` per particle: ``[P, T, Q]`` labels or ``[P, T, Q, D]`` values."""
        if self.kind == "classification":
            return categorical(torch.softmax(self.outputs, -1), generator)
        eps = standard_normal(self.outputs.shape, self.outputs, generator)
        return self.outputs + self.noise * eps

    @property
    def samples(self) -> torch.Tensor:
        """Predictive draws, one per particle (see :meth:`sample`)."""
        return self.sample()

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log predictive density ``log (1/P) Σ_p p(y | w_p)`` per query point, ``[T, Q]``."""
        if self.kind == "classification":
            logp = torch.log_softmax(self.outputs, -1)
            lp = logp.gather(-1, y.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        else:
            lp = torch.distributions.Normal(self.outputs, self.noise).log_prob(y).sum(-1)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise AttributeError(f"{what} is defined for {kind}, this prediction is {self.kind}")


@dataclass
class TaskPosterior:
    """Adapted posteriors ``q_t`` of ``T`` tasks (a guide state cut from θ).

    Attributes
    ----------
    model : HierarchicalBNN
    guide : Guide
    state : guide state, each tensor ``[T, *shape]``
    particles : default number of draws ``P`` for predictions
    """

    model: HierarchicalBNN
    guide: Guide
    state: State
    particles: int = 1

    @property
    def num_tasks(self) -> int:
        return self.guide.num_tasks(self.state)

    def sample_weights(
        self, particles: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Posterior draws of the task weights, ``name → [P, T, *shape]``."""
        return self.guide.sample(self.state, particles or self.particles, generator)

    def predict(
        self,
        query_x: torch.Tensor,
        particles: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Posterior predictive at ``query_x`` ``[T, Q, ...]`` (any inputs with T tasks)."""
        if not isinstance(query_x, torch.Tensor):
            raise TypeError(f"query_x must be a Tensor [T, Q, ...], got {type(query_x).__name__}")
        if query_x.dim() < 2 or query_x.shape[0] != self.num_tasks:
            raise ValueError(
                f"query_x must have shape [T={self.num_tasks}, Q, ...], got {tuple(query_x.shape)}"
            )
        with torch.no_grad():
            w = self.sample_weights(particles, generator)
            f = batched_forward(self.model.net, w, query_x)
        lik = self.model.likelihood
        noise = getattr(lik, "noise", None)
        return Prediction(f, lik.kind, None if noise is None else noise.detach().to(f.dtype))
