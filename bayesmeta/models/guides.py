"""Guides for task posteriors q_t(w), written against an explicit state.

The inner loop adapts a guide's variational parameters by differentiable gradient steps, so
they are plain tensors with a leading task axis, held in a *state*: ``{field: {name: Tensor
[T, *shape]}}``. Both guides start at the prior. ``pyro_guide(state)`` turns a state into a Pyro
guide for the model of :class:`~bayesmeta.models.HierarchicalBNN` (for Pyro's ELBOs,
``Predictive`` and friends); ``sample`` and ``kl`` are the same quantities in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from bayesmeta.models.draws import standard_normal
from bayesmeta.models.hierarchical import HierarchicalBNN

__all__ = ["Guide", "NormalGuide", "DeltaGuide", "State"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: ``{field: {weight name: Tensor [T, *shape]}}``
State = dict[str, dict[str, torch.Tensor]]


class Guide:
    """A family of task posteriors. Subclasses define the state's fields."""

    #: the number of particles a guide of this family can use (``None``: any)
    max_particles: int | None = None

    def init(self, model: HierarchicalBNN, num_tasks: int) -> State:
        """The state at the prior for ``T = num_tasks`` tasks (differentiable in θ)."""
        raise NotImplementedError

    def noise(
        self, state: State, particles: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The standard draws behind :meth:`sample`, ``name → [P, T, *shape]`` (``None`` for a
        deterministic guide). They depend on the state's names, shapes, dtype and device only."""
        return None

    def sample(
        self,
        state: State,
        particles: int,
        generator: torch.Generator | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reparameterised draws ``name → [P, T, *shape]``, from ``noise`` when given."""
        raise NotImplementedError

    def elbo_grads(
        self,
        state: State,
        prior_loc: dict[str, torch.Tensor],
        prior_scale: dict[str, torch.Tensor] | None,
        names: list[str],
        noise: dict[str, torch.Tensor] | None,
        draw_grads: list[torch.Tensor],
        kl_scale: float,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Closed-form gradients of ``L + kl_scale · Σ_t KL(q_t ‖ p)`` for the fields of ``names``.

        ``draw_grads[i]`` is ``∂L/∂w`` ``[P, T, *shape]`` at the draws of ``names[i]`` (made
        from ``noise``); the chain rule through the reparameterisation and the KL's gradient are
        written out. The prior is ``Normal(prior_loc, prior_scale)`` by name, or flat when
        ``prior_scale`` is ``None``. Only the names of ``names`` are read, so the inner loop can
        hand in its weights concatenated under one name. A guide that does not override this
        is differentiated by autograd through the whole ELBO instead.
        """
        raise NotImplementedError

    @classmethod
    def has_closed_form(cls) -> bool:
        """Whether this guide writes out :meth:`elbo_grads`."""
        return cls.elbo_grads is not Guide.elbo_grads

    def kl(self, state: State, model: HierarchicalBNN, flat_prior: bool = False) -> torch.Tensor:
        """``KL(q_t ‖ p(w | θ))`` per task, shape ``[T]`` (up to a constant under a flat prior)."""
        raise NotImplementedError

    def site(self, state: State, name: str) -> dist.TorchDistribution:
        """q of one weight with batch shape ``[T, 1]`` (the model's plates) and shape as event."""
        raise NotImplementedError

    def pyro_guide(self, state: State) -> Callable[..., None]:
        """A Pyro guide ``guide(x, y=None, flat_prior=False)`` for this state."""
        names = list(next(iter(state.values())))

        def guide(x: torch.Tensor, y: torch.Tensor | None = None, flat_prior: bool = False):
            with pyro.plate("tasks", x.shape[0], dim=-2):
                for name in names:
                    pyro.sample(name, self.site(state, name))

        return guide

    @staticmethod
    def num_tasks(state: State) -> int:
        return next(iter(next(iter(state.values())).values())).shape[0]


class NormalGuide(Guide):
    """Mean-field Normal: ``q_t(w) = Normal(loc_t, softplus(scale_raw_t))`` per weight.

    State fields ``loc`` and ``scale_raw``, each ``[T, *shape]``, initialised at (μ, σ).
    """

    def init(self, model: HierarchicalBNN, num_tasks: int) -> State:
        raw = model.prior_scale_raw()
        if raw is None:
            raise ValueError(
                "NormalGuide starts at the prior and needs a finite prior_scale; the model has a "
                "flat prior (prior_scale=None). Use DeltaGuide, or give the model a prior_scale"
            )
        expand = lambda t: t.unsqueeze(0).expand(num_tasks, *t.shape)  # noqa: E731
        return {
            "loc": {k: expand(v) for k, v in model.prior_loc().items()},
            "scale_raw": {k: expand(v) for k, v in raw.items()},
        }

    def noise(self, state, particles, generator=None):
        return {
            name: standard_normal(torch.Size([particles, *loc.shape]), loc, generator)
            for name, loc in state["loc"].items()
        }

    def sample(self, state, particles, generator=None, noise=None):
        if noise is None:
            noise = self.noise(state, particles, generator)
        return {
            name: loc + noise[name] * F.softplus(state["scale_raw"][name])
            for name, loc in state["loc"].items()
        }

    def elbo_grads(self, state, prior_loc, prior_scale, names, noise, draw_grads, kl_scale):
        # Autograd through the sampling and the KL costs about 1.4x these few lines on the
        # inner loop's hot path (sinusoid MLP, P=4), and its double backward costs more.
        out: State = {"loc": {}, "scale_raw": {}}
        for name, gw in zip(names, draw_grads, strict=True):
            loc, raw = state["loc"][name], state["scale_raw"][name]
            scale = F.softplus(raw)
            g_loc, g_scale = gw.sum(0), (gw * noise[name]).sum(0)
            if prior_scale is None:
                g_scale = g_scale - kl_scale / scale  # the negative entropy's gradient
            else:
                var = prior_scale[name].square()
                g_loc = g_loc + kl_scale * (loc - prior_loc[name]) / var
                g_scale = g_scale + kl_scale * (scale / var - 1 / scale)
            out["loc"][name] = g_loc
            out["scale_raw"][name] = g_scale * torch.sigmoid(raw)  # softplus' = sigmoid
        return out

    def kl(self, state, model, flat_prior=False):
        # Closed forms written out: torch.distributions' argument checks cost more than the
        # arithmetic on the inner loop's hot path.
        locs, scales = model.prior_loc(), model.prior_scale()
        total = 0.0
        for name, loc in state["loc"].items():
            scale = F.softplus(state["scale_raw"][name])
            if flat_prior or scales is None:
                # KL to an improper flat prior is the negative entropy (up to a constant).
                kl = -(0.5 + _HALF_LOG_2PI + scale.log())
            else:
                ratio = scale / scales[name]
                kl = 0.5 * (ratio.square() + ((loc - locs[name]) / scales[name]).square() - 1)
                kl = kl - ratio.log()
            total = total + kl.flatten(1).sum(1)
        return total

    def site(self, state, name):
        loc = state["loc"][name]
        scale = F.softplus(state["scale_raw"][name])
        return dist.Normal(loc.unsqueeze(1), scale.unsqueeze(1)).to_event(loc.dim() - 1)


class DeltaGuide(Guide):
    """Point estimate ``q_t(w) = δ(w − loc_t)``; state field ``loc`` ``[T, *shape]`` from μ.

    With a flat prior this is MAML's adaptation; with the learned Gaussian prior it is MAP
    adaptation. Its draws are deterministic, so it uses one particle.
    """

    max_particles = 1

    def init(self, model: HierarchicalBNN, num_tasks: int) -> State:
        return {
            "loc": {
                k: v.unsqueeze(0).expand(num_tasks, *v.shape) for k, v in model.prior_loc().items()
            }
        }

    def sample(self, state, particles, generator=None, noise=None):
        return {name: loc.unsqueeze(0) for name, loc in state["loc"].items()}

    def elbo_grads(self, state, prior_loc, prior_scale, names, noise, draw_grads, kl_scale):
        out: State = {"loc": {}}
        for name, gw in zip(names, draw_grads, strict=True):
            g = gw.sum(0)
            if prior_scale is not None:  # −log N(w; μ, σ) contributes (w − μ)/σ²
                var = prior_scale[name].square()
                g = g + kl_scale * (state["loc"][name] - prior_loc[name]) / var
            out["loc"][name] = g
        return out

    def kl(self, state, model, flat_prior=False):
        T = self.num_tasks(state)
        first = next(iter(state["loc"].values()))
        if flat_prior or model.flat:
            return first.new_zeros(T)
        total = 0.0
        for name, loc in state["loc"].items():
            total = total - model.prior(name).log_prob(loc)
        return total

    def site(self, state, name):
        loc = state["loc"][name]
        return dist.Delta(loc.unsqueeze(1), event_dim=loc.dim() - 1)
