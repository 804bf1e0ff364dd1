"""A conjugate class-conditional Gaussian head: Bayesian prototypes, exact and without steps.

Each task's classes are Gaussians in the body's feature space ``z = φ(x)`` ``[F]``, sharing a
diagonal covariance ``Σ = diag(s²)``; class ``k``'s mean has the conjugate prior
``μ_k ~ Normal(m, Σ/κ)``. Given the ``n_k`` support features of class ``k``, with sum ``Z_k``::

    μ_k | support ~ Normal(m_k, Σ/(κ + n_k)),      m_k = (κ·m + Z_k) / (κ + n_k)
    z | k, support ~ Normal(m_k, Σ·(1 + 1/(κ + n_k)))
    p(y = k | x, support) ∝ Normal(φ(x); m_k, Σ·(1 + 1/(κ + n_k)))

(uniform class prior). This is a prototypical network (Snell et al. 2017) with shrinkage toward
a learned mean, a learned metric and a variance that knows how many shots each class has. The
meta-parameters ``m [F]``, ``κ`` and ``s [F]`` are learned with the body through the query log
predictive; everything per task is in closed form, so there are no inner steps. Its logits are
log densities of the features, so :func:`bayesmeta.inference.uncertainty_scores`'s ``energy``
is the query's negative log predictive density under the task's classes (plus a constant).
"""

from __future__ import annotations

import math
from typing import TypedDict

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from bayesmeta.models.draws import standard_normal
from bayesmeta.models.guides import Guide, State, Weights, _expand, register_guide
from bayesmeta.models.hierarchical import HierarchicalBNN
from bayesmeta.models.predictive import LabelPredictive
from bayesmeta.nets import LINEAR_HEAD, has_linear_head

__all__ = ["ClassGaussianGuide", "class_sums", "class_prototypes"]

_LOG_2PI = math.log(2 * math.pi)


def class_sums(
    features: torch.Tensor, y: torch.Tensor, ways: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's support count ``[T, N]`` and feature sum ``[T, N, F]``, from features
    ``[T, S, F]`` and integer labels ``y [T, S]`` in ``[0, N)`` (differentiable in the
    features)."""
    onehot = F.one_hot(y.long(), ways).to(features.dtype)  # [T, S, N]
    return onehot.sum(1), torch.einsum("tsn,tsf->tnf", onehot, features)


def class_prototypes(features: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Each class's mean support feature ``c_k`` ``[T, N, F]`` (0 for a class without one)."""
    counts, sums = class_sums(features, y, ways)
    return sums / counts.clamp(min=1).unsqueeze(-1)


class ClassGaussianState(TypedDict):
    """:class:`ClassGaussianGuide`'s state: the body's means, and under ``classes`` each class's
    mean (``mean``, ``mean_var``) and the within-class variance (``within_var``)."""

    loc: Weights
    classes: Weights


@register_guide("class-gaussian")
class ClassGaussianGuide(Guide):
    """The exact posterior of each class's mean, and its Gaussian posterior predictive.

    State: ``loc`` (θ's means of every weight, ``[T, *shape]``: the body is shared by the tasks
    and the network's own head is unused) and ``classes``: ``mean`` ``[T, N, F]`` (``m_k``),
    ``mean_var`` ``[T, N, F]`` (the posterior variance of ``μ_k``, ``s²/(κ + n_k)``) and
    ``within_var`` ``[T, F]`` (``s²``). Needs a network with a linear head (its output size
    ``N`` is the number of classes, its input size ``F`` the features') and a classification
    likelihood; meta-parameters (:meth:`hyperparameters`): ``m`` (init 0), ``log κ`` (init
    ``log 0.1``) and ``log s`` (init 0).

    A draw of the class means is a linear classifier, the plug-in Gaussian one:
    ``head.weight_k = μ_k / s²``, ``head.bias_k = −½ Σ_d μ_kd² / s_d²`` (the terms common to
    every class dropped), so :meth:`sample` gives network weights like any guide.
    """

    state_type = ClassGaussianState

    exact = True
    #: the meta-parameters' names in ``model.guide_params``
    LOC, LOG_KAPPA, LOG_SCALE = "class_mean_loc", "class_mean_log_kappa", "class_log_scale"

    @staticmethod
    def check(model: HierarchicalBNN, adapt=None) -> None:
        """Raise ``ValueError`` unless this head can classify with ``model``."""
        problems = []
        if not has_linear_head(model.net):
            problems.append(f"a network with a linear head (MLP, Conv4), got {type(model.net)}")
        if not isinstance(model.likelihood.predictive, LabelPredictive):
            problems.append(
                f"a classification likelihood (Categorical), got {type(model.likelihood).__name__}"
            )
        if adapt is not None and sorted(adapt) != sorted(LINEAR_HEAD):
            problems.append(f"adapt = the head {list(LINEAR_HEAD)}, got {list(adapt)}")
        if problems:
            raise ValueError("the class-conditional Gaussian head needs " + "; ".join(problems))

    @staticmethod
    def conjugate(model: HierarchicalBNN) -> bool:
        return True

    def closed_form_predictive(self, model: HierarchicalBNN) -> bool:
        return True

    def hyperparameters(self, model: HierarchicalBNN) -> dict[str, torch.Tensor]:
        self.check(model)
        ways, features = model.shapes()["head.weight"]
        like = model.prior_loc()["head.weight"]
        return {
            self.LOC: like.new_zeros(features),
            self.LOG_KAPPA: like.new_tensor(math.log(0.1)),
            self.LOG_SCALE: like.new_zeros(features),
        }

    def _prior(self, model: HierarchicalBNN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``m [F]``, ``κ []``, ``s² [F]`` from the model's meta-parameters."""
        p = model.guide_params
        if self.LOC not in p:
            raise ValueError(
                "the model has no class-conditional Gaussian meta-parameters; build the learner "
                "(MetaLearner) with this guide, which adds them, before adapting"
            )
        return p[self.LOC], p[self.LOG_KAPPA].exp(), (2 * p[self.LOG_SCALE]).exp()

    def init(self, model, num_tasks, adapt=None, generator=None):
        self.check(model, adapt)
        m, kappa, var = self._prior(model)
        ways = model.shapes()["head.weight"][0]
        mean = m.expand(num_tasks, ways, m.shape[-1])
        return {
            "loc": {k: _expand(v, num_tasks) for k, v in model.prior_loc().items()},
            "classes": {
                "mean": mean,
                "mean_var": (var / kappa).expand_as(mean),
                "within_var": var.expand(num_tasks, var.shape[-1]),
            },
        }

    def point_names(self, state):
        return set(state["loc"]) - set(LINEAR_HEAD)

    def condition(self, model, state, features, y, steps=1, step=1.0) -> State:
        """The posterior of every class mean from support features ``[T, S, F]`` and integer
        labels ``y [T, S]`` in ``[0, N)`` (``steps`` and ``step`` are ignored: it is exact)."""
        m, kappa, var = self._prior(model)
        counts, sums = class_sums(features, y, state["classes"]["mean"].shape[1])
        shrink = (kappa + counts).unsqueeze(-1)  # [T, N, 1]
        classes = {
            "mean": (kappa * m + sums) / shrink,
            "mean_var": var / shrink,
            "within_var": var.expand(features.shape[0], var.shape[-1]),
        }
        return {"loc": dict(state["loc"]), "classes": classes}

    def predictive_outputs(self, model, state, features):
        """``log p(z | k, support)`` ``[1, T, B, N]`` at features ``[T, B, F]``: the logits of
        the exact posterior predictive (their softmax is ``p(y = k | x, support)``)."""
        c = state["classes"]
        var = c["within_var"].unsqueeze(1) + c["mean_var"]  # [T, N, F]
        diff = features.unsqueeze(2) - c["mean"].unsqueeze(1)  # [T, B, N, F]
        quad = (diff.square() / var.unsqueeze(1)).sum(-1)
        return (-0.5 * (quad + (var.log() + _LOG_2PI).sum(-1).unsqueeze(1))).unsqueeze(0)

    def noise(self, state, particles, generator=None):
        mean = state["classes"]["mean"]
        return {
            "head.weight": standard_normal(torch.Size([particles, *mean.shape]), mean, generator)
        }

    def sample(self, state, particles, generator=None, noise=None):
        if noise is None:
            noise = self.noise(state, particles, generator)
        c = state["classes"]
        mu = c["mean"] + c["mean_var"].sqrt() * noise["head.weight"]  # [P, T, N, F]
        precision = c["within_var"].reciprocal().unsqueeze(1)  # [T, 1, F]
        out = {
            name: loc.unsqueeze(0).expand(particles, *loc.shape)
            for name, loc in state["loc"].items()
            if name not in LINEAR_HEAD
        }
        out["head.weight"] = mu * precision
        out["head.bias"] = -0.5 * (mu.square() * precision).sum(-1)
        return {name: out[name] for name in state["loc"]}  # in the state's order

    def kl(self, state, model, flat_prior=False, names=None):
        """``KL(q(μ_k) ‖ Normal(m, Σ/κ))`` summed over classes, ``[T]``; 0 under ``flat_prior``
        (the network's weights carry no prior with this head: see the method's notes)."""
        c = state["classes"]
        if flat_prior:
            return c["mean"].new_zeros(c["mean"].shape[0])
        m, kappa, var = self._prior(model)
        prior_var = var / kappa
        ratio = c["mean_var"] / prior_var
        kl = 0.5 * (ratio + (c["mean"] - m).square() / prior_var - 1 - ratio.log())
        return kl.sum((-2, -1))

    def site(self, state, name):
        if name in LINEAR_HEAD:
            raise NotImplementedError(
                "the class-conditional head's weights are functions of the class means, which "
                "Pyro's per-site guides cannot express; use TaskPosterior.sample_weights or predict"
            )
        loc = state["loc"][name]
        return dist.Delta(loc.unsqueeze(1), event_dim=loc.dim() - 1)
