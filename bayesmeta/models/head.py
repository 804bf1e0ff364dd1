"""A full-covariance Gaussian posterior over a linear head, fit by Newton steps.

With the body shared by all tasks (a point θ), each task's posterior over its head is fit on
the body's features. Under a Normal likelihood it is conjugate: one Newton step gives the exact
posterior, Bayesian linear regression (as in ALPaCA, Harrison et al. 2018). Under another
likelihood with a written-out output Fisher (Categorical) damped Newton steps with the
Gauss-Newton curvature find the Laplace approximation, with a full covariance per output, so
that the uncertainty shrinks along the support set's features and not only coordinate by
coordinate. The meta-gradient runs through the Cholesky factorisations into the body, the prior
and the noise.
"""

from __future__ import annotations

import math
from typing import TypedDict

import pyro.distributions as dist
import torch

from bayesmeta.models.classes import class_prototypes
from bayesmeta.models.draws import standard_normal
from bayesmeta.models.guides import Guide, State, Weights, _expand, register_guide
from bayesmeta.models.hierarchical import HierarchicalBNN
from bayesmeta.models.likelihoods import Likelihood, Normal
from bayesmeta.models.predictive import LabelPredictive
from bayesmeta.nets import LINEAR_HEAD, has_linear_head

__all__ = ["GaussianHeadGuide", "PrototypeLaplaceGuide"]


class GaussianHeadState(TypedDict):
    """:class:`GaussianHeadGuide`'s state: the weights' means, and under ``"head"`` the Cholesky
    factor of the head's precision per output."""

    loc: Weights
    precision_tril: Weights


@register_guide("gaussian-head")
class GaussianHeadGuide(Guide):
    """Gaussian posterior of the head with a full covariance per output: for each output ``o``
    of ``T`` tasks, ``[w_o; b_o] ~ Normal(m_o, Λ_o⁻¹)``. For features ``Φ = [φ(x), 1]``
    ``[S, F+1]`` of the support inputs, a Newton step of size ``ρ`` from ``m_o`` is::

        Λ_o = diag(1/σ_o²) + Φᵀ diag(F_o) Φ
        m_o ← m_o − ρ Λ_o⁻¹ (Φᵀ ∂NLL/∂f_o + (m_o − μ_o)/σ_o²)

    with ``F_o`` the likelihood's output Fisher at ``f = Φ m`` (``1/s²`` for a Normal with
    noise ``s``, ``p_o(1 − p_o)`` for a Categorical: the Gauss-Newton curvature, block-diagonal
    over the classes). Under a Normal likelihood one full step (``ρ = 1``) from anywhere is the
    exact posterior, ``m_o = Λ_o⁻¹ (μ_o/σ_o² + Φᵀ y_o / s²)``; otherwise the steps converge to
    the Laplace approximation.

    State: ``loc`` (the head's posterior means ``[T, O, F]``, ``[T, O]``; the body pinned at μ)
    and ``precision_tril`` ``{"head": [T, O, F+1, F+1]}``, the Cholesky factor of ``Λ`` at the
    final means. Needs a network with a linear head (``MLP``, ``Conv4``), a likelihood with an
    output Fisher (``Normal``, ``Categorical``) and a finite prior; the body is shared by the
    tasks (``adapt`` = the head).
    """

    state_type = GaussianHeadState

    exact = True
    needs_prior = True

    @staticmethod
    def check(model: HierarchicalBNN, adapt=None) -> None:
        """Raise ``ValueError`` unless this guide can fit the head of ``model``."""
        problems = []
        if not has_linear_head(model.net):
            problems.append(f"a network with a linear head (MLP, Conv4), got {type(model.net)}")
        if type(model.likelihood).output_fisher is Likelihood.output_fisher:
            problems.append(
                "a likelihood with an output Fisher (Normal, Categorical), got "
                f"{type(model.likelihood).__name__}"
            )
        if model.flat:
            problems.append("a finite prior_scale, got None")
        if adapt is not None and sorted(adapt) != sorted(LINEAR_HEAD):
            problems.append(f"adapt = the head {list(LINEAR_HEAD)}, got {list(adapt)}")
        if problems:
            raise ValueError("the Gaussian head posterior needs " + "; ".join(problems))

    @staticmethod
    def conjugate(model: HierarchicalBNN) -> bool:
        """Whether one full Newton step is the exact posterior (a Normal likelihood)."""
        return isinstance(model.likelihood, Normal)

    def closed_form_predictive(self, model: HierarchicalBNN) -> bool:
        return self.conjugate(model)

    def gaussian_marginal(self, model: HierarchicalBNN) -> bool:
        return self.conjugate(model)

    def init(self, model, num_tasks, adapt=None, generator=None):
        self.check(model, adapt)
        _, var = _prior(model)
        tril = torch.diag_embed(var.rsqrt())  # Λ = diag(1/σ²) at the prior
        return {
            "loc": {k: _expand(v, num_tasks) for k, v in model.prior_loc().items()},
            "precision_tril": {"head": _expand(tril, num_tasks)},
        }

    def point_names(self, state):
        return set(state["loc"]) - set(LINEAR_HEAD)

    def condition(
        self,
        model: HierarchicalBNN,
        state: State,
        features: torch.Tensor,
        y: torch.Tensor,
        steps: int = 1,
        step: float = 1.0,
    ) -> State:
        """Fit the head to support features ``[T, S, F]`` and targets ``y`` by ``steps`` Newton
        steps of size ``step`` from ``state``'s means (one full step, the exact posterior,
        under a Normal likelihood, whatever ``steps`` and ``step``)."""
        if self.conjugate(model):
            steps, step = 1, 1.0
        mean0, var0 = _prior(model)  # [O, F+1]
        kept = {}
        if "prior_loc" in state:  # a prior mean of the task's own ([T, O, F+1])
            mean0 = state["prior_loc"]["head"]
            kept = {"prior_loc": state["prior_loc"]}
        phi = _with_ones(features)  # [T, S, k]
        m = _head_mean(state)  # [T, O, k]
        lik = model.likelihood
        for i in range(steps + 1):
            f = torch.einsum("tsk,tok->tso", phi, m)
            fisher = lik.output_fisher(f)  # [T, S, O]
            precision = torch.diag_embed(1 / var0) + torch.einsum(
                "tsk,tso,tsl->tokl", phi, fisher, phi
            )
            tril = torch.linalg.cholesky(precision)
            if i == steps:
                break  # the precision at the final means
            if not f.requires_grad:
                f.requires_grad_()
            nll = -lik.log_prob(f, y).sum()
            (df,) = torch.autograd.grad(nll, [f], create_graph=torch.is_grad_enabled())
            grad = torch.einsum("tsk,tso->tok", phi, df) + (m - mean0) / var0
            m = m - step * torch.cholesky_solve(grad.unsqueeze(-1), tril).squeeze(-1)
            if self.conjugate(model):
                break  # the precision does not depend on the means
        loc = dict(state["loc"])
        loc["head.weight"], loc["head.bias"] = m[..., :-1], m[..., -1]
        return {"loc": loc, "precision_tril": {"head": tril}, **kept}

    def noise(self, state, particles, generator=None):
        return {
            name: standard_normal(
                torch.Size([particles, *state["loc"][name].shape]), loc, generator
            )
            for name, loc in state["loc"].items()
            if name in LINEAR_HEAD
        }

    def sample(self, state, particles, generator=None, noise=None):
        if noise is None:
            noise = self.noise(state, particles, generator)
        tril = state["precision_tril"]["head"]  # [T, O, k, k]
        eps = torch.cat([noise["head.weight"], noise["head.bias"].unsqueeze(-1)], -1)
        # Λ⁻¹ = L⁻ᵀ L⁻¹, so L⁻ᵀ ε has the posterior covariance.
        z = torch.linalg.solve_triangular(tril.mT, eps.unsqueeze(-1), upper=True).squeeze(-1)
        head = _head_mean(state) + z  # [P, T, O, F+1]
        out = {}
        for name, loc in state["loc"].items():
            if name == "head.weight":
                out[name] = head[..., :-1]
            elif name == "head.bias":
                out[name] = head[..., -1]
            else:
                out[name] = loc.unsqueeze(0).expand(particles, *loc.shape)
        return out

    def marginal(self, state: State, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance ``[T, B, O]`` of the head's outputs at features ``[T, B, F]``."""
        phi = _with_ones(features)  # [T, B, k]
        mean = phi @ _head_mean(state).transpose(1, 2)
        tril = state["precision_tril"]["head"]  # [T, O, k, k]
        v = torch.linalg.solve_triangular(tril, phi.transpose(1, 2).unsqueeze(1), upper=False)
        return mean, v.square().sum(-2).transpose(1, 2)  # φᵀΛ⁻¹φ = ‖L⁻¹φ‖²

    def kl(self, state, model, flat_prior=False, names=None):
        # KL(N(m, Λ⁻¹) ‖ N(m0, diag v0)) per output, summed.
        mean0, var0 = _prior(model)
        if "prior_loc" in state:
            mean0 = state["prior_loc"]["head"]
        tril = state["precision_tril"]["head"]
        eye = torch.eye(tril.shape[-1], dtype=tril.dtype, device=tril.device)
        inv = torch.linalg.solve_triangular(tril, eye.expand_as(tril), upper=False)
        cov_diag = inv.square().sum(-2)  # diag of Λ⁻¹ = L⁻ᵀL⁻¹
        diff = _head_mean(state) - mean0
        logdet_cov = -2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        kl = 0.5 * (
            (cov_diag / var0).sum(-1)
            + (diff.square() / var0).sum(-1)
            - var0.shape[-1]
            + var0.log().sum(-1)
            - logdet_cov
        )
        return kl.sum(-1)

    def site(self, state, name):
        loc = state["loc"][name]
        if name in LINEAR_HEAD:
            raise NotImplementedError(
                "the exact head posterior is joint over head.weight and head.bias, which Pyro's "
                "per-site guides cannot express; use TaskPosterior.sample_weights or predict"
            )
        return dist.Delta(loc.unsqueeze(1), event_dim=loc.dim() - 1)


@register_guide("prototype-laplace")
class PrototypeLaplaceGuide(GaussianHeadGuide):
    """The Laplace head of a classifier, centred on the task's class prototypes, with its
    predictive in logit space.

    The prior mean of each task's head is Proto-MAML's prototype classifier times a learned
    scale ``a``, plus θ's mean: ``[w_k; b_k] ~ Normal(μ_k + a·[2c_k; −‖c_k‖²], diag σ_k²)`` with
    ``c_k`` the mean support feature of class ``k`` (a zero-mean prior keeps its width in every
    direction the support features do not span, so one shot classified poorly). The Newton
    steps of :class:`GaussianHeadGuide` then find the Laplace posterior from that mean. The
    predictive is the probit approximation over the logits' Gaussian marginal (MacKay 1992):
    ``softmax_k(τ f̄_k / √(1 + π τ² v_k / 8))`` with ``f̄, v`` the mean and variance of logit
    ``k`` (:meth:`marginal`) and a learned temperature ``τ``: one deterministic prediction
    instead of a noisy average over weight draws. ``a`` (init 1), ``log τ`` (init 0), σ and the
    body are meta-trained through it. A classification likelihood only.
    """

    SCALE, LOG_TEMPERATURE = "laplace_prototype_scale", "laplace_log_temperature"

    @staticmethod
    def check(model: HierarchicalBNN, adapt=None) -> None:
        GaussianHeadGuide.check(model, adapt)
        if not isinstance(model.likelihood.predictive, LabelPredictive):
            raise ValueError(
                "the prototype Laplace head needs a classification likelihood (Categorical), got "
                f"{type(model.likelihood).__name__}"
            )

    def closed_form_predictive(self, model: HierarchicalBNN) -> bool:
        return True

    def hyperparameters(self, model: HierarchicalBNN) -> dict[str, torch.Tensor]:
        like = model.prior_loc()["head.bias"]
        return {self.SCALE: like.new_tensor(1.0), self.LOG_TEMPERATURE: like.new_tensor(0.0)}

    def _params(self, model: HierarchicalBNN) -> tuple[torch.Tensor, torch.Tensor]:
        p = model.guide_params
        if self.SCALE not in p:
            raise ValueError(
                "the model has no prototype Laplace meta-parameters; build the learner "
                "(MetaLearner) with this guide, which adds them, before adapting"
            )
        return p[self.SCALE], p[self.LOG_TEMPERATURE].exp()

    def condition(self, model, state, features, y, steps=1, step=1.0):
        scale, _ = self._params(model)
        protos = class_prototypes(features, y, state["loc"]["head.weight"].shape[-2])
        head = torch.cat([2 * protos, -protos.square().sum(-1, keepdim=True)], -1)
        mean0 = _prior(model)[0] + scale * head  # [T, N, F+1]
        loc = dict(state["loc"])
        loc["head.weight"], loc["head.bias"] = mean0[..., :-1], mean0[..., -1]
        start = {**state, "loc": loc, "prior_loc": {"head": mean0}}
        return super().condition(model, start, features, y, steps, step)

    def predictive_outputs(self, model, state, features):
        _, temperature = self._params(model)
        mean, var = self.marginal(state, features)  # [T, B, N]
        scaled = temperature * mean / (1 + math.pi / 8 * temperature.square() * var).sqrt()
        return scaled.unsqueeze(0)


def _prior(model: HierarchicalBNN) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's prior mean and variance, ``[O, F+1]`` each (bias last)."""
    loc, scale = model.prior_loc(), model.prior_scale()
    mean = torch.cat([loc["head.weight"], loc["head.bias"].unsqueeze(-1)], -1)
    sd = torch.cat([scale["head.weight"], scale["head.bias"].unsqueeze(-1)], -1)
    return mean, sd.square()


def _head_mean(state: State) -> torch.Tensor:
    """``[T, O, F+1]``: the posterior means of the head's weights and bias."""
    loc = state["loc"]
    return torch.cat([loc["head.weight"], loc["head.bias"].unsqueeze(-1)], -1)


def _with_ones(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones_like(features[..., :1])], -1)
