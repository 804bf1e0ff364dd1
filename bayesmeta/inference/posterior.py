"""Adapted task posteriors and their predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bayesmeta.inference._checks import check_inputs, check_int, check_log_prob, check_memory
from bayesmeta.inference.forward import NetOutputs, closed_form_outputs
from bayesmeta.models import (
    Bernoulli,
    Categorical,
    Guide,
    HierarchicalBNN,
    Likelihood,
    Normal,
    State,
    predictive,
)

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

    Its statistics are its likelihood's (:attr:`Likelihood.predictive
    <bayesmeta.models.Likelihood.predictive>`, see :mod:`bayesmeta.models.predictive`); those
    of another kind of target (``probs`` of a regression, ``crps`` of a classification) raise
    ``AttributeError``.

    Attributes
    ----------
    outputs : Tensor ``[P, T, Q, O]``
        Network outputs per posterior particle (logits, regression means, or whatever the
        likelihood reads).
    kind : ``"classification"``, ``"regression"`` or ``"multilabel"``
        The likelihood's kind (given without a likelihood, it chooses one).
    noise : Tensor, scalar, optional
        Observation noise of a ``Normal`` likelihood (default: the likelihood's, detached when
        the prediction is made; required for ``"regression"`` without a likelihood).
    output_var : Tensor ``[T, Q, O]``, optional
        Variance of the outputs around each particle's value, where a posterior gives it in
        closed form (a ``Normal`` likelihood): each particle's predictive is then
        ``Normal(outputs_p, sqrt(noise² + output_var))``.
    likelihood : Likelihood, optional
        The observation model; without it, ``Categorical()``, ``Normal()`` (with ``noise``)
        or ``Bernoulli()`` by ``kind``.

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
    DRAWS = predictive.DRAWS

    def __post_init__(self) -> None:
        if self.likelihood is None:
            if self.kind not in _BY_KIND:
                raise ValueError(
                    f"kind must be one of {sorted(_BY_KIND)} when no likelihood is given, got "
                    f"{self.kind!r}"
                )
            self.likelihood = _BY_KIND[self.kind](self.noise)
        elif self.likelihood.kind != self.kind:
            raise ValueError(
                f"kind must be the likelihood's, {self.likelihood.kind!r} for "
                f"{type(self.likelihood).__name__}, got {self.kind!r}"
            )
        self._stats.settle(self)

    @property
    def _stats(self) -> predictive.Predictive:
        return self.likelihood.predictive

    @property
    def probs(self) -> torch.Tensor:
        """Predictive probabilities: ``[T, Q, N]`` of the classes (classification, mean over
        particles) or ``[T, Q, L]`` of each label being 1 (multi-label)."""
        return self._stats.probs(self)

    @property
    def mean(self) -> torch.Tensor:
        """Predictive mean ``[T, Q, D]``; for classification and multi-label, ``probs``."""
        return self._stats.mean(self)

    @property
    def stddev(self) -> torch.Tensor:
        """Predictive standard deviation ``[T, Q, D]``: noise and spread over particles
        (regression)."""
        return self._stats.stddev(self)

    def quantile(
        self, q: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Quantile of the predictive mixture, ``[T, Q, D]`` (regression).

        ``Normal``: bisection on the mixture's CDF (exact to ~1e-6 of the predictive spread).
        Other likelihoods: the empirical quantile of :data:`DRAWS` draws (``generator``).
        """
        return self._stats.quantile(self, q, generator)

    def crps(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continuous ranked probability score of targets ``y [T, Q, D]`` under the predictive
        mixture, ``E|Y − y| − E|Y − Y'|/2`` (closed form for Gaussians, else from draws), mean
        over ``D``: ``[T, Q]``. Lower is better; it rewards sharpness and calibration together
        (regression)."""
        return self._stats.crps(self, y, generator)

    @property
    def entropy(self) -> torch.Tensor:
        """Entropy of the predictive per query point, ``[T, Q]`` (nats): total uncertainty.

        Classification: of the mean probabilities. Multi-label: the sum over labels of each
        label's mean-probability entropy. Regression: of the Gaussian with the predictive's
        variance (``stddev²``), summed over ``D``.
        """
        return self._stats.entropy(self)

    @property
    def mutual_information(self) -> torch.Tensor:
        """Mutual information between a query's label and the weights, ``[T, Q]`` (nats): the
        epistemic part of :attr:`entropy`, 0 for a point estimate.

        Classification and multi-label: entropy of the mean minus the mean entropy over
        particles. Regression: ``½ Σ_D log(stddev² / mean noise variance)``, the Gaussian form
        (the spread over particles and a closed-form posterior's output variance are epistemic,
        the likelihood's own variance aleatoric).
        """
        return self._stats.mutual_information(self)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``y`` per particle: ``[P, T, Q]`` labels or ``[P, T, Q, D]`` values."""
        return self._stats.sample(self, generator)

    @property
    def samples(self) -> torch.Tensor:
        """Predictive draws, one per particle (see :meth:`sample`)."""
        return self.sample()

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Log predictive density ``log (1/P) Σ_p p(y | w_p)`` per query point, ``[T, Q]``.

        ``y``: labels ``[T, Q]`` in ``[0, N)`` (classification), targets ``[T, Q, D]``
        (regression) or 0/1 labels ``[T, Q, L]`` (multi-label).
        """
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a Tensor, got {type(y).__name__}")
        self._stats.check_observed(self, y)
        lp = check_log_prob(self.likelihood, self._stats.log_prob(self, y), self.outputs)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def scores(
        self,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        levels: tuple[float, ...] = (),
    ) -> dict[str, torch.Tensor]:
        """What :func:`~bayesmeta.inference.evaluate` scores at targets ``y``, per task and per
        point (:meth:`bayesmeta.models.predictive.Predictive.point_scores`)."""
        return self._stats.point_scores(self, y, generator, levels)

    def uncertainty_scores(self) -> dict[str, torch.Tensor]:
        """Per-query scores ``[T, Q]`` (see :func:`bayesmeta.inference.uncertainty_scores`)."""
        return self._stats.uncertainty_scores(self)


def _normal(noise: torch.Tensor | None) -> Normal:
    if noise is None:
        raise ValueError("a regression Prediction without a likelihood needs its noise, got None")
    return Normal()  # (its statistics read the prediction's noise)


#: The likelihood a Prediction built without one reads its outputs with, given its noise.
_BY_KIND = {
    "classification": lambda noise: Categorical(),
    "regression": _normal,
    "multilabel": lambda noise: Bernoulli(),
}


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

    def width_ratio(self) -> dict[str, torch.Tensor]:
        """Each weight tensor's posterior σ over its prior σ, averaged over the tensor:
        name → ``[T]``. 1 where adaptation left the widths at the prior's, near 0 for a point
        mass: how a Normal posterior shows that it is one. Needs per-weight scales in the
        state (``"scale_raw"``: the Normal guides) and a prior with a scale."""
        raw, prior = self.state.get("scale_raw"), self.model.prior_scale()
        if raw is None or prior is None:
            raise ValueError(
                "width_ratio needs a posterior with per-weight scales (a Normal guide, state "
                f"field 'scale_raw') under a prior with a scale; got {type(self.guide).__name__} "
                f"with fields {sorted(self.state)} and "
                + ("a flat prior" if prior is None else "a prior scale")
            )
        T = self.num_tasks
        with torch.no_grad():
            return {n: (F.softplus(r) / prior[n]).reshape(T, -1).mean(1) for n, r in raw.items()}

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
        return Prediction(f, lik.kind, output_var=output_var, likelihood=lik)  # (noise: lik's)

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
