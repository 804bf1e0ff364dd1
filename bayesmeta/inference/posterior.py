"""Adapted task posteriors and their predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bayesmeta.inference._checks import check_inputs, check_int, check_log_prob, check_memory
from bayesmeta.inference.forward import NetOutputs, closed_form_outputs
from bayesmeta.models import Categorical, Guide, HierarchicalBNN, Likelihood, Normal, State
from bayesmeta.models.draws import categorical, standard_normal

__all__ = ["TaskPosterior", "Prediction", "MEMORY_LIMIT"]

#: Bytes that posterior draws may ask for before they are refused with a ``ValueError``, up
#: front: those of :meth:`TaskPosterior.predict` (the outputs ``[P, T, Q, O]`` and the weight
#: draws ``[P, T, *shape]``) and those of one inner step of a learner's adaptation or meta-step
#: (:meth:`~bayesmeta.models.Guide.step_bytes`, per task chunk). The forward's activations are
#: transient and not counted.
MEMORY_LIMIT = 4 * 2**30


@dataclass
class Prediction:
    """Posterior predictive of a meta-batch at query inputs: the mixture over posterior
    particles ``(1/P) Σ_p p(y | f_p)`` of the likelihood's distribution.

    Attributes
    ----------
    outputs : Tensor ``[P, T, Q, O]``
        Network outputs per posterior particle (logits, regression means, or whatever the
        likelihood reads).
    kind : ``"classification"``, ``"regression"`` or ``"multilabel"``
    noise : Tensor, scalar
        Observation noise (a ``Normal`` likelihood only).
    output_var : Tensor ``[T, Q, O]``, optional
        Variance of the outputs around each particle's value, where a posterior gives it in
        closed form (a ``Normal`` likelihood): each particle's predictive is then
        ``Normal(outputs_p, sqrt(noise² + output_var))``.
    likelihood : Likelihood, optional
        The observation model; without it, ``Normal(noise)`` or ``Categorical`` by ``kind``.

    Regression scores are exact for a ``Normal`` likelihood; for others the quantiles and the
    CRPS are Monte Carlo estimates from :data:`DRAWS` draws of the mixture per point, and the
    entropy and mutual information take the Gaussian form with the mixture's variance.
    """

    outputs: torch.Tensor
    kind: str
    noise: torch.Tensor | None = None
    output_var: torch.Tensor | None = None
    likelihood: Likelihood | None = None

    #: draws of the predictive mixture per point behind non-Gaussian quantiles and CRPS
    DRAWS = 1024

    @property
    def _gaussian(self) -> bool:
        return self.likelihood is None or isinstance(self.likelihood, Normal)

    # classification ----------------------------------------------------------------
    @property
    def probs(self) -> torch.Tensor:
        """Predictive probabilities: ``[T, Q, N]`` of the classes (classification, mean over
        particles) or ``[T, Q, L]`` of each label being 1 (multi-label)."""
        if self.kind == "multilabel":
            return torch.sigmoid(self.outputs).mean(0)
        self._need("classification", "probs")
        return torch.softmax(self.outputs, -1).mean(0)

    # regression --------------------------------------------------------------------
    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each particle's predictive mean and variance, ``[P, T, Q, D]``."""
        if self._gaussian:
            return self.outputs, self._scale().square().expand_as(self.outputs)
        return self.likelihood.mean_var(self.outputs)

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean ``[T, Q, D]``; for classification and multi-label, ``probs``."""
        if self.kind in ("classification", "multilabel"):
            return self.probs
        return self._moments()[0].mean(0)

    @property
    def stddev(self) -> torch.Tensor:
        """Predictive standard deviation ``[T, Q, D]``: noise and spread over particles."""
        self._need("regression", "stddev")
        if self._gaussian:  # (noise² added once, not averaged over particles: exact)
            return (self.outputs.var(0, unbiased=False) + self._scale().square()).sqrt()
        mean, var = self._moments()
        return (var.mean(0) + mean.var(0, unbiased=False)).sqrt()

    def _scale(self) -> torch.Tensor:
        """Each particle's predictive standard deviation under a ``Normal`` likelihood."""
        if self.output_var is None:
            return self.noise
        return (self.noise.square() + self.output_var).sqrt()

    def _draws(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of the mixture per point, ``[n, T, Q, D]`` (particles in turn)."""
        P = self.outputs.shape[0]
        f = self.outputs.repeat(-(-n // P), 1, 1, 1)[:n]
        return self.likelihood.sample(f, generator)

    def quantile(
        self, q: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Quantile of the predictive mixture, ``[T, Q, D]``.

        ``Normal``: bisection on the mixture's CDF (exact to ~1e-6 of the predictive spread).
        Other likelihoods: the empirical quantile of :data:`DRAWS` draws (``generator``).
        """
        self._need("regression", "quantile")
        q = torch.as_tensor(q, dtype=self.outputs.dtype, device=self.outputs.device)
        if bool(((q <= 0) | (q >= 1)).any()):
            raise ValueError(f"q must lie in (0, 1), got {q.tolist()}")
        if not self._gaussian:
            return self._draws(self.DRAWS, generator).quantile(q, dim=0)
        normal = torch.distributions.Normal(self.outputs, self._scale())
        width = 8 * self.stddev + 8 * (self.outputs.max(0).values - self.outputs.min(0).values)
        lo, hi = self.mean - width, self.mean + width
        for _ in range(50):
            mid = (lo + hi) / 2
            below = normal.cdf(mid.unsqueeze(0)).mean(0) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def crps(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continuous ranked probability score of targets ``y [T, Q, D]`` under the predictive
        mixture, ``E|Y − y| − E|Y − Y'|/2`` (closed form for Gaussians, else from draws), mean
        over ``D``: ``[T, Q]``. Lower is better; it rewards sharpness and calibration together."""
        self._need("regression", "crps")
        if not self._gaussian:
            # Y and Y' independent: b's draws are shuffled, else the i-th of each would come
            # from the same particle whenever P divides DRAWS, hiding the particles' spread.
            a, b = self._draws(self.DRAWS, generator), self._draws(self.DRAWS, generator)
            device = generator.device if generator is not None else b.device
            b = b[torch.randperm(self.DRAWS, generator=generator, device=device).to(b.device)]
            return ((a - y).abs().mean(0) - 0.5 * (a - b).abs().mean(0)).mean(-1)
        scale = self._scale().expand_as(self.outputs)  # [P, T, Q, D]
        to_y = _abs_moment(self.outputs - y, scale.square())
        between = _abs_moment(
            self.outputs.unsqueeze(0) - self.outputs.unsqueeze(1),
            scale.square().unsqueeze(0) + scale.square().unsqueeze(1),
        )
        return (to_y.mean(0) - 0.5 * between.mean((0, 1))).mean(-1)

    # all kinds ---------------------------------------------------------------------
    @property
    def entropy(self) -> torch.Tensor:
        """Entropy of the predictive per query point, ``[T, Q]`` (nats): total uncertainty.

        Classification: of the mean probabilities. Multi-label: the sum over labels of each
        label's mean-probability entropy. Regression: of the Gaussian with the predictive's
        variance (``stddev²``), summed over ``D``.
        """
        if self.kind == "classification":
            return _entropy(self.probs)
        if self.kind == "multilabel":
            return _binary_entropy(self.probs).sum(-1)
        return 0.5 * (2 * math.pi * math.e * self.stddev.square()).log().sum(-1)

    @property
    def mutual_information(self) -> torch.Tensor:
        """Mutual information between a query's label and the weights, ``[T, Q]`` (nats): the
        epistemic part of :attr:`entropy`, 0 for a point estimate.

        Classification and multi-label: entropy of the mean minus the mean entropy over
        particles. Regression: ``½ Σ_D log(stddev² / mean noise variance)``, the Gaussian form
        (the spread over particles and a closed-form posterior's output variance are epistemic,
        the likelihood's own variance aleatoric).
        """
        if self.kind == "classification":
            return self.entropy - _entropy(torch.softmax(self.outputs, -1)).mean(0)
        if self.kind == "multilabel":
            each = _binary_entropy(torch.sigmoid(self.outputs)).sum(-1)
            return self.entropy - each.mean(0)
        if self._gaussian:
            aleatoric = self.noise.square()
        else:
            aleatoric = self._moments()[1].mean(0)
        return (self.stddev.square() / aleatoric).log().sum(-1) / 2

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``y`` per particle: ``[P, T, Q]`` labels or ``[P, T, Q, D]`` values."""
        if self.kind == "classification" and self.likelihood is None:
            return categorical(torch.softmax(self.outputs, -1), generator)
        if self._gaussian:
            eps = standard_normal(self.outputs.shape, self.outputs, generator)
            return self.outputs + self._scale() * eps
        return self.likelihood.sample(self.outputs, generator)

    @property
    def samples(self) -> torch.Tensor:
        """Predictive draws, one per particle (see :meth:`sample`)."""
        return self.sample()

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log predictive density ``log (1/P) Σ_p p(y | w_p)`` per query point, ``[T, Q]``.

        ``y``: labels ``[T, Q]`` in ``[0, N)`` (classification), targets ``[T, Q, D]``
        (regression) or 0/1 labels ``[T, Q, L]`` (multi-label).
        """
        _check_observed(y, self.outputs, self.kind, self.likelihood)
        if self.kind == "classification" and self.likelihood is None:
            logp = torch.log_softmax(self.outputs, -1)
            lp = logp.gather(-1, y.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        elif self._gaussian and self.kind == "regression":
            lp = torch.distributions.Normal(self.outputs, self._scale()).log_prob(y).sum(-1)
        else:
            lp = self.likelihood.log_prob(self.outputs, y)
            lp = check_log_prob(self.likelihood, lp, self.outputs)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise AttributeError(f"{what} is defined for {kind}, this prediction is {self.kind}")


def _check_observed(
    y: object, outputs: torch.Tensor, kind: str, likelihood: Likelihood | None = None
) -> None:
    """Refuse observations that cannot be scored against ``outputs [P, T, Q, O]`` (a wrong
    shape would broadcast into a silently wrong score, a bad label fail deep in torch)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a Tensor, got {type(y).__name__}")
    T, Q, width = outputs.shape[1:]
    if likelihood is not None and not isinstance(likelihood, (Normal, Categorical)):
        if tuple(y.shape[:2]) != (T, Q):
            raise ValueError(
                f"y must have shape [T, Q, ...] = [{T}, {Q}, ...], got {tuple(y.shape)}"
            )
        likelihood.check_targets(y, width, "y")
        return
    if kind == "classification":
        if y.is_floating_point() or y.dtype == torch.bool or tuple(y.shape) != (T, Q):
            raise ValueError(
                f"y must hold integer class labels of shape [T, Q] = [{T}, {Q}], got "
                f"{y.dtype} of shape {tuple(y.shape)}"
            )
        lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
        if lo < 0 or hi >= width:
            raise ValueError(f"y labels must lie in [0, {width}), found range [{lo}, {hi}]")
    elif not y.is_floating_point() or tuple(y.shape) != (T, Q, width):
        raise ValueError(
            f"y must hold real targets of shape [T, Q, D] = [{T}, {Q}, {width}], got {y.dtype} of "
            f"shape {tuple(y.shape)}"
        )


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


@dataclass
class TaskPosterior:
    """Adapted posteriors ``q_t`` of ``T`` tasks (a guide state cut from θ).

    Attributes
    ----------
    model : HierarchicalBNN
    guide : Guide
    state : guide state, each tensor ``[T, *shape]``
    particles : default number of draws ``P`` for predictions
    context : Tensor ``[T, S, ...]`` or None
        The support inputs that normalise the queries (see
        :func:`bayesmeta.nets.batched_forward`), so that a query's prediction does not depend on
        the other queries; ``None`` normalises a query batch with its own statistics
        (transductive).
    """

    model: HierarchicalBNN
    guide: Guide
    state: State
    particles: int = 1
    context: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.guide.num_tasks(self.state)

    def sample_weights(
        self, particles: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Posterior draws of the task weights, ``name → [P, T, *shape]``."""
        particles = self.particles if particles is None else check_int("particles", particles)
        return self.guide.sample(self.state, particles, generator)

    def outputs(
        self,
        x: torch.Tensor,
        particles: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Network outputs ``[P, T, B, O]`` at inputs ``x [T, B, ...]`` under posterior draws,
        differentiable (in θ, for a posterior from ``MetaLearner.adapt_differentiable``)."""
        forward = NetOutputs(self.model, self.guide, self.state, x, self.context)
        return forward(self.sample_weights(particles, generator))

    def predict(
        self,
        query_x: torch.Tensor,
        particles: int | None = None,
        generator: torch.Generator | None = None,
        dropout: bool = False,
    ) -> Prediction:
        """Posterior predictive at ``query_x`` ``[T, Q, ...]`` (any inputs with T tasks; finite,
        floating point, converted to the model's dtype), from ``particles`` draws (a positive
        int; default :attr:`particles`).

        The network runs in evaluation mode (dropout off), unless ``dropout``. ``particles``
        whose draws would take more than :data:`MEMORY_LIMIT` bytes are refused
        (``ValueError``) before any is drawn."""
        if particles is not None:
            check_int("particles", particles)
        if not isinstance(query_x, torch.Tensor):
            raise TypeError(f"query_x must be a Tensor [T, Q, ...], got {type(query_x).__name__}")
        if query_x.dim() < 2 or query_x.shape[0] != self.num_tasks:
            raise ValueError(
                f"query_x must have shape [T={self.num_tasks}, Q, ...], got {tuple(query_x.shape)}"
            )
        query_x = check_inputs(
            "query_x", query_x, self.model.prior_loc()[self.model.names[0]].dtype
        )
        lik = self.model.likelihood
        output_var = None
        net, was_training = self.model.net, self.model.net.training
        net.train(dropout)
        with torch.no_grad():
            outputs = NetOutputs(self.model, self.guide, self.state, query_x, self.context)
            closed = closed_form_outputs(self.guide, self.model, self.state, outputs)
            if closed is not None:  # the predictive without draws: one "particle"
                f, output_var = closed
            else:
                self._check_draw_size(query_x, self.particles if particles is None else particles)
                f = outputs(self.sample_weights(particles, generator))
        net.train(was_training)
        noise = lik.noise.detach().to(f.dtype) if isinstance(lik, Normal) else None
        return Prediction(f, lik.kind, noise, output_var, lik)

    def _check_draw_size(self, query_x: torch.Tensor, particles: int) -> None:
        """Refuse ``particles`` draws whose outputs ``P·T·Q·O`` and weight draws ``P·T·Σ|w|``
        would take more than :data:`MEMORY_LIMIT` bytes, before allocating them."""
        limit = self.guide.max_particles
        P = particles if limit is None else min(particles, limit)  # (a guide's draws are all)
        T, Q = query_x.shape[:2]
        loc = self.model.prior_loc()
        weights = sum(w.numel() for w in loc.values())
        out = self.model.out_features(query_x)
        size = next(iter(loc.values())).element_size()
        per_particle = T * (Q * out + weights) * size
        check_memory(
            P * per_particle,
            MEMORY_LIMIT,
            f"particles={particles}",
            f"for the predictive draws (outputs P·T·Q·O = {P}·{T}·{Q}·{out} and weight draws "
            f"P·T·Σ|w| = {P}·{T}·{weights} values of {size} bytes)",
            f"ask for at most {MEMORY_LIMIT // per_particle} particles here, or predict fewer "
            "tasks or query points per call and concatenate",
        )
