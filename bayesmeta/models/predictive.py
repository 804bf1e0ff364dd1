"""What a likelihood's posterior predictive offers: its statistics and its scores.

A likelihood names one of these as its ``predictive``; a
:class:`~bayesmeta.inference.Prediction` (outputs ``[P, T, Q, O]`` per posterior particle, an
optional closed-form ``output_var [T, Q, O]``, the likelihood's ``noise``) hands itself to it
for every statistic, and ``evaluate``, the out-of-episode scores, the ArviZ export and the
diagnostics ask it what to score. A likelihood of a new kind of target brings its own
subclass; the three here serve class labels (:class:`LabelPredictive`), independent 0/1
labels (:class:`BinaryPredictive`) and real targets (:class:`RealPredictive`, exact for a
Gaussian in :class:`GaussianPredictive`).

The methods take the prediction ``pred`` (any object with ``outputs``, ``output_var``,
``noise``, ``likelihood`` and ``kind``) and return tensors shaped as its documented
attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from bayesmeta.models.draws import categorical, standard_normal

__all__ = [
    "Predictive",
    "LabelPredictive",
    "BinaryPredictive",
    "RealPredictive",
    "GaussianPredictive",
]

#: draws of the predictive mixture per point behind Monte Carlo quantiles and CRPS
DRAWS = 1024


class Predictive:
    """Base class. Every predictive defines :meth:`mean`, :meth:`entropy`,
    :meth:`mutual_information` and :meth:`point_scores`; draws, the log density of
    observations and their check default to the likelihood's. The statistics of another kind
    of target (``probs``, ``stddev``, ``quantile``, ``crps``) raise ``AttributeError`` naming
    the kind they are defined for."""

    def settle(self, pred: Any) -> None:
        """Complete a new prediction (a Normal's noise, fixed when it is made)."""

    def probs(self, pred: Any) -> torch.Tensor:
        raise _undefined("probs", "classification", pred)

    def mean(self, pred: Any) -> torch.Tensor:
        raise NotImplementedError

    def stddev(self, pred: Any) -> torch.Tensor:
        raise _undefined("stddev", "regression", pred)

    def quantile(self, pred: Any, q: torch.Tensor, generator=None) -> torch.Tensor:
        raise _undefined("quantile", "regression", pred)

    def crps(self, pred: Any, y: torch.Tensor, generator=None) -> torch.Tensor:
        raise _undefined("crps", "regression", pred)

    def entropy(self, pred: Any) -> torch.Tensor:
        raise NotImplementedError

    def mutual_information(self, pred: Any) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, pred: Any, generator=None) -> torch.Tensor:
        """One draw of ``y`` per particle."""
        return pred.likelihood.sample(pred.outputs, generator)

    def log_prob(self, pred: Any, y: torch.Tensor) -> torch.Tensor:
        """``log p(y | f_p)`` per particle and point, ``[P, T, Q]``."""
        return pred.likelihood.log_prob(pred.outputs, y)

    def check_observed(self, pred: Any, y: torch.Tensor) -> None:
        """Refuse observations ``y`` that cannot be scored against the outputs (a wrong shape
        would broadcast into a silently wrong score, a bad label fail deep in torch)."""
        T, Q, width = pred.outputs.shape[1:]
        if tuple(y.shape[:2]) != (T, Q):
            raise ValueError(
                f"y must have shape [T, Q, ...] = [{T}, {Q}, ...], got {tuple(y.shape)}"
            )
        pred.likelihood.check_targets(y, width, "y")

    def point_scores(
        self, pred: Any, y: torch.Tensor, generator=None, levels: Sequence[float] = ()
    ) -> dict[str, torch.Tensor]:
        """What ``evaluate`` scores at query targets ``y``: ``per_task [T]`` (accuracy or
        squared error), per point ``confidence`` and ``losses`` (for the risk-coverage curve),
        and the kind's own: ``probs [M, C]`` and ``labels [M]`` of every decision (for
        calibration), or ``crps``, ``lower_<c>`` / ``upper_<c>`` for each central interval
        level ``c`` and ``targets`` (for coverage)."""
        raise NotImplementedError

    def uncertainty_scores(self, pred: Any) -> dict[str, torch.Tensor]:
        """Per-query scores ``[T, Q]``, higher where a query is less likely to belong."""
        return {"entropy": pred.entropy, "mutual_information": pred.mutual_information}

    def posterior_predictive(
        self, likelihood: Any, f: torch.Tensor, generator=None
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict[str, int]]:
        """The draws an ArviZ export keeps at outputs ``f [N, T, Q, O]``: variables
        ``[N, T, Q, ...]``, the names of their axes after ``[N, T, Q]``, and those axes' sizes."""
        raise NotImplementedError


class LabelPredictive(Predictive):
    """One label of ``N`` classes per point, from logits ``[P, T, Q, N]``."""

    def probs(self, pred: Any) -> torch.Tensor:
        return torch.softmax(pred.outputs, -1).mean(0)

    def mean(self, pred: Any) -> torch.Tensor:
        return pred.probs

    def entropy(self, pred: Any) -> torch.Tensor:
        return _entropy(pred.probs)

    def mutual_information(self, pred: Any) -> torch.Tensor:
        return pred.entropy - _entropy(torch.softmax(pred.outputs, -1)).mean(0)

    def check_observed(self, pred: Any, y: torch.Tensor) -> None:
        T, Q, width = pred.outputs.shape[1:]
        if y.is_floating_point() or y.dtype == torch.bool or tuple(y.shape) != (T, Q):
            raise ValueError(
                f"y must hold integer class labels of shape [T, Q] = [{T}, {Q}], got "
                f"{y.dtype} of shape {tuple(y.shape)}"
            )
        lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
        if lo < 0 or hi >= width:
            raise ValueError(f"y labels must lie in [0, {width}), found range [{lo}, {hi}]")
        pred.likelihood.check_targets(y, width, "y")  # (and whatever the likelihood asks)

    def point_scores(self, pred, y, generator=None, levels=()):
        p = pred.probs
        return {
            "per_task": (p.argmax(-1) == y).double().mean(-1),
            "probs": p.reshape(-1, p.shape[-1]),
            "labels": y.reshape(-1),
            "confidence": p.max(-1).values.flatten(),
            "losses": (p.argmax(-1) != y).double().flatten(),
        }

    def uncertainty_scores(self, pred: Any) -> dict[str, torch.Tensor]:
        """Also ``neg_max_logit``, minus the largest logit (mean over particles), and
        ``energy``, ``−log Σ_k exp(logit_k)`` (Liu et al. 2020)."""
        logits = pred.outputs.mean(0)  # [T, Q, N]
        return {
            **super().uncertainty_scores(pred),
            "neg_max_logit": -logits.max(-1).values,
            "energy": -torch.logsumexp(logits, -1),
        }

    def posterior_predictive(self, likelihood, f, generator=None):
        probs = torch.softmax(f.double(), -1)
        obs = categorical(probs.float(), generator)
        dims = {"obs": [], "probs": ["class"]}
        return {"obs": obs, "probs": probs}, dims, {"class": f.shape[-1]}


class BinaryPredictive(Predictive):
    """Independent 0/1 labels ``[T, Q, L]``, from logits ``[P, T, Q, L]``; every label is a
    two-way decision."""

    def probs(self, pred: Any) -> torch.Tensor:
        return torch.sigmoid(pred.outputs).mean(0)

    def mean(self, pred: Any) -> torch.Tensor:
        return pred.probs

    def entropy(self, pred: Any) -> torch.Tensor:
        return _binary_entropy(pred.probs).sum(-1)

    def mutual_information(self, pred: Any) -> torch.Tensor:
        each = _binary_entropy(torch.sigmoid(pred.outputs)).sum(-1)
        return pred.entropy - each.mean(0)

    def point_scores(self, pred, y, generator=None, levels=()):
        p, hit = pred.probs, (pred.probs > 0.5) == (y > 0.5)  # [T, Q, L]
        return {
            "per_task": hit.double().mean((-1, -2)),
            "probs": torch.stack([1 - p, p], -1).reshape(-1, 2),
            "labels": (y > 0.5).long().reshape(-1),
            "confidence": torch.maximum(p, 1 - p).mean(-1).flatten(),
            "losses": (~hit).double().mean(-1).flatten(),
        }

    def posterior_predictive(self, likelihood, f, generator=None):
        return _real_draws(likelihood, f, generator, "label")


class RealPredictive(Predictive):
    """Real targets ``[T, Q, D]``: the mixture over particles of the likelihood's
    :meth:`~bayesmeta.models.Likelihood.mean_var`. Quantiles and the CRPS are Monte Carlo
    estimates from :data:`DRAWS` draws of the mixture per point; the entropy and the mutual
    information take the Gaussian form with the mixture's variance."""

    def moments(self, pred: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Each particle's predictive mean and variance, ``[P, T, Q, D]``."""
        return pred.likelihood.mean_var(pred.outputs)

    def mean(self, pred: Any) -> torch.Tensor:
        return self.moments(pred)[0].mean(0)

    def stddev(self, pred: Any) -> torch.Tensor:
        mean, var = self.moments(pred)
        return (var.mean(0) + mean.var(0, unbiased=False)).sqrt()

    def aleatoric_var(self, pred: Any) -> torch.Tensor:
        """The likelihood's own variance, mean over particles."""
        return self.moments(pred)[1].mean(0)

    def entropy(self, pred: Any) -> torch.Tensor:
        return 0.5 * (2 * math.pi * math.e * pred.stddev.square()).log().sum(-1)

    def mutual_information(self, pred: Any) -> torch.Tensor:
        return (pred.stddev.square() / self.aleatoric_var(pred)).log().sum(-1) / 2

    def draws(self, pred: Any, n: int, generator=None) -> torch.Tensor:
        """``n`` draws of the mixture per point, ``[n, T, Q, D]`` (particles in turn)."""
        P = pred.outputs.shape[0]
        f = pred.outputs.repeat(-(-n // P), 1, 1, 1)[:n]
        return pred.likelihood.sample(f, generator)

    def quantile(self, pred, q, generator=None):
        q = _check_q(q, pred.outputs)
        return self.draws(pred, _draws(pred), generator).quantile(q, dim=0)

    def crps(self, pred, y, generator=None):
        # Y and Y' independent: b's draws are shuffled, else the i-th of each would come
        # from the same particle whenever P divides DRAWS, hiding the particles' spread.
        n = _draws(pred)
        a, b = self.draws(pred, n, generator), self.draws(pred, n, generator)
        device = generator.device if generator is not None else b.device
        b = b[torch.randperm(n, generator=generator, device=device).to(b.device)]
        return ((a - y).abs().mean(0) - 0.5 * (a - b).abs().mean(0)).mean(-1)

    def point_scores(self, pred, y, generator=None, levels=()):
        error = (pred.mean - y).square().mean(-1)  # [T, Q]
        out = {
            "per_task": error.mean(-1),
            "confidence": -pred.stddev.mean(-1).flatten(),
            "losses": error.flatten(),
            "crps": pred.crps(y, generator).flatten(),
        }
        for c in levels:
            out[f"lower_{c}"] = pred.quantile((1 - c) / 2, generator)
            out[f"upper_{c}"] = pred.quantile((1 + c) / 2, generator)
        out["targets"] = y
        return out

    def posterior_predictive(self, likelihood, f, generator=None):
        return _real_draws(likelihood, f, generator, "output")


class GaussianPredictive(RealPredictive):
    """A Normal likelihood's: each particle's predictive is ``Normal(f_p, scale)`` with
    ``scale² = noise² + output_var``, so every score is exact (the quantiles by bisection on
    the mixture's CDF, to about 1e-6 of the predictive spread)."""

    def settle(self, pred: Any) -> None:
        # The noise as it is when the prediction is made (detached), not as a learned noise
        # moves on later.
        if pred.noise is None:
            pred.noise = pred.likelihood.noise.detach().to(pred.outputs.dtype)

    def scale(self, pred: Any) -> torch.Tensor:
        """Each particle's predictive standard deviation."""
        if pred.output_var is None:
            return pred.noise
        return (pred.noise.square() + pred.output_var).sqrt()

    def moments(self, pred: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return pred.outputs, self.scale(pred).square().expand_as(pred.outputs)

    def stddev(self, pred: Any) -> torch.Tensor:
        # noise² added once, not averaged over particles: exact
        return (pred.outputs.var(0, unbiased=False) + self.scale(pred).square()).sqrt()

    def aleatoric_var(self, pred: Any) -> torch.Tensor:
        return pred.noise.square()

    def sample(self, pred: Any, generator=None) -> torch.Tensor:
        eps = standard_normal(pred.outputs.shape, pred.outputs, generator)
        return pred.outputs + self.scale(pred) * eps

    def log_prob(self, pred: Any, y: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(pred.outputs, self.scale(pred))
        return normal.log_prob(y).sum(-1)

    def check_observed(self, pred: Any, y: torch.Tensor) -> None:
        T, Q, width = pred.outputs.shape[1:]
        if not y.is_floating_point() or tuple(y.shape) != (T, Q, width):
            raise ValueError(
                f"y must hold real targets of shape [T, Q, D] = [{T}, {Q}, {width}], got "
                f"{y.dtype} of shape {tuple(y.shape)}"
            )

    def quantile(self, pred, q, generator=None):
        q, outputs = _check_q(q, pred.outputs), pred.outputs
        normal = torch.distributions.Normal(outputs, self.scale(pred))
        width = 8 * pred.stddev + 8 * (outputs.max(0).values - outputs.min(0).values)
        lo, hi = pred.mean - width, pred.mean + width
        for _ in range(50):
            mid = (lo + hi) / 2
            below = normal.cdf(mid.unsqueeze(0)).mean(0) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def crps(self, pred, y, generator=None):
        outputs = pred.outputs
        var = self.scale(pred).expand_as(outputs).square()  # [P, T, Q, D]
        to_y = _abs_moment(outputs - y, var)
        between = _abs_moment(
            outputs.unsqueeze(0) - outputs.unsqueeze(1), var.unsqueeze(0) + var.unsqueeze(1)
        )
        return (to_y.mean(0) - 0.5 * between.mean((0, 1))).mean(-1)


def _real_draws(likelihood, f, generator, name):
    # The likelihood draws (Normal: f + noise · ε); its targets may be fewer than the
    # outputs (a heteroscedastic Normal predicts a mean and a scale per target).
    obs = likelihood.sample(f, generator)
    f_dim = name if obs.shape[-1] == f.shape[-1] else "net_output"
    coords = {name: obs.shape[-1], f_dim: f.shape[-1]}
    return {"obs": obs, "f": f}, {"obs": [name], "f": [f_dim]}, coords


def _undefined(what: str, kind: str, pred: Any) -> AttributeError:
    by = type(pred.likelihood.predictive).__name__
    return AttributeError(
        f"{what} is defined for {kind}, this prediction is {pred.kind} (scored by {by})"
    )


def _draws(pred: Any) -> int:
    """Draws of the mixture per point behind Monte Carlo scores: the prediction's ``DRAWS``."""
    return getattr(pred, "DRAWS", DRAWS)


def _check_q(q: Any, like: torch.Tensor) -> torch.Tensor:
    q = torch.as_tensor(q, dtype=like.dtype, device=like.device)
    if bool(((q <= 0) | (q >= 1)).any()):
        raise ValueError(f"q must lie in (0, 1), got {q.tolist()}")
    return q


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def _abs_moment(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E|X|`` for ``X ~ Normal(mean, var)``."""
    sd = var.sqrt()
    z = mean / sd
    normal = torch.distributions.Normal(0.0, 1.0)
    return sd * math.sqrt(2 / math.pi) * torch.exp(-0.5 * z.square()) + mean * (
        2 * normal.cdf(z) - 1
    )
