"""Update rules: how one inner step turns the support set's gradients into a new posterior.

The inner loop (:mod:`bayesmeta.inference.inner`) draws weights from each task's posterior,
differentiates the support set's negative log likelihood at the draws, and hands the result
to the method's rule::

    gradient  state ← state − lr·c·∇ (plain steps, measured in the likelihood's and the prior's
              curvature c: :func:`~bayesmeta.inference.inner.plain_step_size`)
    natural   the means' steps times the posterior's variance (the inverse Fisher information);
              on a linear head with a Gauss-Newton curvature, variational online Newton
    von       variational online Newton on every weight: the precision moves toward the prior's
              plus the likelihood's curvature (a sampled Fisher information), and the mean steps
              by the new variance
    ivon      the same with the curvature estimated from the draws' gradients (IVON's)

A guide declares what a rule needs (:attr:`~bayesmeta.models.Guide.newton_steps`, closed-form
:meth:`~bayesmeta.models.Guide.elbo_grads`); a guide that fits itself (``guide.exact``) takes
no rule. A new rule is a subclass of :class:`UpdateRule` passed as ``MetaLearner(update=...)``,
or registered by :func:`register_update_rule` so that saved learners name it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from bayesmeta.models import Guide, Prior, State

__all__ = [
    "UpdateRule",
    "GradientRule",
    "NaturalRule",
    "VONRule",
    "StepInputs",
    "UPDATE_RULES",
    "register_update_rule",
    "resolve_update_rule",
]


@dataclass(frozen=True)
class StepInputs:
    """What one inner step hands its rule, for the adapted weights joined under ``name``.

    ``draw_grad`` ``[P, T, D]``: the gradient at the draws (made from ``noise``, ``[P, T, D]``
    or ``None`` for a deterministic guide) of the support set's negative log likelihood,
    averaged over the draws, summed over points and divided by ``support``, the number of
    points ``S``. ``lr``: a number or ``[T, D]``-broadcastable tensor (Meta-SGD's).
    ``head_curvature``: where the adapted weights are a linear head on a fixed body, a
    callable that gives the exact diagonal Gauss-Newton curvature ``[T, D]`` of the summed
    negative log likelihood at the current draws, else ``None``. ``sampled_grad``
    ``[P, T, D]``, for a rule with :attr:`~UpdateRule.sampled_fisher`: the same gradient as
    ``draw_grad`` but at targets drawn from the likelihood at the draws' outputs. ``moments``:
    the guide's :attr:`~bayesmeta.models.Guide.local_reparameterisation` gave the gradients in
    the means and the scales directly; ``draw_grad`` is then ``[Σ_p g, Σ_p g·ε]`` ``[2, T, D]``,
    ``noise`` is ``None`` and ``sampled_grad`` is ``[1, T, D]``.
    """

    guide: Guide
    name: str
    prior: Prior
    noise: dict[str, torch.Tensor] | None
    draw_grad: torch.Tensor
    lr: float | torch.Tensor
    first_order: bool
    support: int
    head_curvature: Callable[[], torch.Tensor] | None = None
    sampled_grad: torch.Tensor | None = None
    moments: bool = False

    def nll_gradient(self) -> torch.Tensor:
        """The summed negative log likelihood's expected gradient ``[T, D]``."""
        mean = self.draw_grad[0] if self.moments else self.draw_grad.sum(0)
        return mean * self.support


class UpdateRule:
    """How an inner step moves a guide's state (see the module's table).

    A subclass sets :attr:`name` and :attr:`default_lr`, and defines :meth:`step`; it may refuse
    guides in :meth:`check`. :attr:`plain` says whether ``lr`` is a plain step's size, which
    the inner loop then measures in the likelihood's and the prior's curvature.
    """

    name: ClassVar[str] = ""
    #: the inner step size a learner takes when none is given
    default_lr: ClassVar[float] = 0.03
    #: ``lr`` is preconditioned by :func:`~bayesmeta.inference.inner.plain_step_size`
    plain: ClassVar[bool] = False
    #: the step reads ``StepInputs.sampled_grad`` (one more backward pass per step)
    sampled_fisher: ClassVar[bool] = False

    def check(self, guide: Guide, backend: str) -> None:
        """Raise ``ValueError`` unless this rule can step ``guide`` with the ELBO ``backend``.
        Default: any guide; only a plain rule may take autograd's gradients."""
        if guide.local_reparameterisation and backend != "analytic":
            raise ValueError(
                f"{type(guide).__name__} draws pre-activations in the analytic ELBO only, got "
                f"elbo={backend!r}"
            )
        if not self.plain and not (backend == "analytic" and guide.has_closed_form()):
            raise ValueError(
                f"update={self.name!r} needs a guide with closed-form gradients and the analytic "
                f"ELBO, got {type(guide).__name__} with elbo={backend!r}"
            )

    def step(self, state: State, inputs: StepInputs) -> State:
        """The state after one step (fields of ``inputs.name``; others as they are)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GradientRule(UpdateRule):
    """Plain gradient steps on the negative ELBO, through the guide's :meth:`Guide.step`."""

    name = "gradient"
    plain = True

    def step(self, state, inputs):
        s = inputs
        return s.guide.step(state, s.prior, [s.name], s.noise, [s.draw_grad], s.lr, s.first_order)


class NaturalRule(UpdateRule):
    """Natural-gradient steps (:meth:`Guide.natural_step`): each mean's step is scaled by its
    posterior variance (:meth:`Guide.natural_grads`), so that a step of size 1 moves a mean the
    data do not inform straight to the prior's, whatever the prior's scale; the widths take
    plain steps.
    On a linear head with a Gauss-Newton curvature (``inputs.head_curvature``) and a guide
    with :attr:`~Guide.newton_steps`, a variational online Newton step
    (:meth:`NormalGuide.newton_step <bayesmeta.models.NormalGuide.newton_step>`) instead."""

    name = "natural"

    def step(self, state, inputs):
        s = inputs
        if s.head_curvature is not None and s.guide.newton_steps:
            grad, hess = s.nll_gradient(), s.head_curvature()
            if s.first_order:
                grad, hess = grad.detach(), hess.detach()
            return s.guide.newton_step(state, {s.name: grad}, {s.name: hess}, s.prior, s.lr)
        args = (s.prior, [s.name], s.noise, [s.draw_grad], s.lr, s.first_order)
        return s.guide.natural_step(state, *args)


class VONRule(UpdateRule):
    """Variational online Newton on every adapted weight (Khan et al. 2018; IVON, Shen et al.
    2024): per step of size ``ρ = lr``, with ``h`` an estimate of the summed negative log
    likelihood's expected curvature (the diagonal) from the current draws::

        b  = 1/σ² + h
        Λ' = (1 − ρ)·Λ + ρ·b  [+ ρ²·(Λ − b)²/(2Λ)]      (Λ = 1/s², the posterior's precision)
        m' = m − ρ·(E[g] + (m − μ)/σ²) / Λ'

    ``curvature="fisher"`` (the default, ``"von"``): the Fisher information's diagonal from
    targets drawn from the likelihood at the draws' outputs, ``h = E[ĝ²]`` with ``ĝ`` the
    gradient at those targets; unbiased, since the points' sampled gradients have mean zero and
    are independent, and never negative; one more backward pass per step.
    ``curvature="price"`` (``"ivon"``): Price's theorem, ``h = E[g·ε]/s`` from the gradients
    already taken; unbiased for the expected Hessian but of either sign, so the bracketed
    term (the Riemannian correction of Lin et al. 2020, as in IVON) keeps ``Λ'`` above half of
    ``Λ``. Either way the mean's step is bounded by the curvature. Guides with
    :attr:`~Guide.newton_steps` only (:class:`NormalGuide`).
    """

    name = "von"
    default_lr = 0.03

    def __init__(self, curvature: str = "fisher"):
        if curvature not in ("fisher", "price"):
            raise ValueError(f"curvature must be 'fisher' or 'price', got {curvature!r}")
        self.curvature = curvature
        self.name = "von" if curvature == "fisher" else "ivon"
        self.sampled_fisher = curvature == "fisher"

    def __repr__(self) -> str:
        return f"VONRule(curvature={self.curvature!r})"

    def check(self, guide, backend):
        super().check(guide, backend)
        if not guide.newton_steps:
            raise ValueError(
                f"update={self.name!r} needs a guide that takes Newton steps (newton_steps = "
                f"True, e.g. NormalGuide), got {type(guide).__name__}"
            )

    def step(self, state, inputs):
        s = inputs
        grad = s.nll_gradient()
        if self.curvature == "fisher":
            # sampled_grad[p] is ĝ_p / (P·S): E_p[ĝ_p²] = P·S²·Σ_p sampled_grad[p]².
            P = s.sampled_grad.shape[0]
            hess = s.sampled_grad.square().sum(0) * (P * s.support**2)
        else:
            noise = None if s.noise is None else s.noise[s.name]
            draws = s.guide.curvature_estimate(state, s.name, noise, s.draw_grad)
            hess = draws * s.support
        if s.first_order:
            grad, hess = grad.detach(), hess.detach()
        return s.guide.newton_step(
            state, {s.name: grad}, {s.name: hess}, s.prior, s.lr, noisy=self.curvature == "price"
        )


#: The rules a method or ``MetaLearner(update=...)`` may name.
UPDATE_RULES: dict[str, UpdateRule] = {}


def register_update_rule(rule: UpdateRule) -> UpdateRule:
    """Make ``rule`` nameable by its :attr:`~UpdateRule.name` (and learners saved with it
    loadable). Returns ``rule``."""
    if not isinstance(rule, UpdateRule) or not isinstance(rule.name, str) or not rule.name:
        raise ValueError(f"register_update_rule takes an UpdateRule with a name, got {rule!r}")
    UPDATE_RULES[rule.name] = rule
    return rule


for _rule in (GradientRule(), NaturalRule(), VONRule("fisher"), VONRule("price")):
    register_update_rule(_rule)


def resolve_update_rule(update: str | UpdateRule) -> UpdateRule:
    """The rule ``update`` names, or ``update`` itself."""
    if isinstance(update, UpdateRule):
        return update
    if update not in UPDATE_RULES:
        raise ValueError(
            f"update must be one of {sorted(UPDATE_RULES)} or an UpdateRule, got {update!r} "
            "(a rule of your own is named once registered: register_update_rule)"
        )
    return UPDATE_RULES[update]
