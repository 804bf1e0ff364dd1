"""Task posteriors as sets of particles moved by Stein variational gradient descent (SVGD).

Bayesian MAML (Yoon et al. 2018): each task's posterior is ``M`` particles, drawn from the
meta-learned prior and moved by SVGD on the task's log posterior. Unlike a mean-field Normal,
a set of particles can hold several modes. The inner loop runs SVGD through the guide
protocol: :meth:`ParticleGuide.elbo_grads` returns the SVGD direction (with its sign flipped,
as the loop descends), so the particles take the same batched, differentiable steps as every
other guide's parameters.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from bayesmeta.models.draws import standard_normal
from bayesmeta.models.guides import Guide, State, Weights, _expand, register_guide

__all__ = ["ParticleGuide", "rbf_kernel"]


def rbf_kernel(
    particles: torch.Tensor, bandwidth: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RBF kernel between particles, and the Stein repulsion it makes.

    ``k(a, b) = exp(−Σ_d (a_d − b_d)² / h_d)`` with, by default, Pyro's median heuristic per
    dimension (``pyro.infer.RBFSteinKernel``): ``h_d`` = the median over pairs of
    ``(a_d − b_d)²``, divided by ``log(M + 1)``. The bandwidth carries no gradient.

    Parameters
    ----------
    particles : Tensor ``[M, *lead, D]`` (``lead``: e.g. the task axis)
    bandwidth : a fixed ``h`` for every dimension, instead of the heuristic

    Returns
    -------
    kernel : Tensor ``[M, M, *lead]``, ``kernel[j, m] = k(particles[j], particles[m])``
    repulsion : Tensor ``[M, *lead, D]``, ``Σ_j ∂k(a, particles[m])/∂a`` at ``a = particles[j]``
        for each ``m``, i.e. ``−2/h · Σ_j k_jm (w_j − w_m)``

    Both are computed with products of ``[M, *lead, D]`` tensors, never the ``M²·D`` pairwise
    differences (but for the heuristic's median, taken without gradient).
    """
    M = particles.shape[0]
    if bandwidth is not None:
        h = torch.full_like(particles[0], float(bandwidth))
    elif M == 1:
        h = torch.ones_like(particles[0])  # one particle: k = 1 and no repulsion either way
    else:
        with torch.no_grad():
            rows, cols = torch.triu_indices(M, M, offset=1, device=particles.device)
            pairs = (particles[rows] - particles[cols]).square()  # [pairs, *lead, D]
            median = pairs.kthvalue((len(rows) + 1) // 2, 0).values  # the lower one, as torch's
            h = (median / math.log(M + 1)).clamp_min(torch.finfo(particles.dtype).tiny)
    # Both are unchanged by a shift of all particles. Centred, |u|² stays near D·log(M+1)
    # instead of growing with the particles' distance from 0 over their spread: the float32
    # rounding of |u_j|² + |u_m|² − 2 u_j·u_m put k(w, w) at 0.69 on a sinusoid MLP, and
    # overflowed exp on a Conv4 body drawn at a tenth of its weights' size.
    centred = particles - particles.mean(0, keepdim=True).detach()
    u = centred * h.detach().rsqrt()
    sq = u.square().sum(-1)  # [M, *lead]
    cross = torch.einsum("j...d,m...d->jm...", u, u)
    distance = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * cross).clamp_min(0)
    off_diagonal = 1 - torch.eye(M, dtype=u.dtype, device=u.device)  # (k(w, w) = 1 exactly)
    kernel = torch.exp(-distance * off_diagonal.reshape(M, M, *[1] * (distance.dim() - 2)))
    weighted = torch.einsum("jm...,j...d->m...d", kernel, centred)
    repulsion = -2 / h.detach() * (weighted - centred * kernel.sum(0).unsqueeze(-1))
    return kernel, repulsion


class ParticleState(TypedDict):
    """:class:`ParticleGuide`'s state: ``particles`` ``[M, T, *shape]`` of the adapted weights, and
    ``loc`` of the pinned ones."""

    particles: Weights
    loc: Weights


@register_guide("particles")
class ParticleGuide(Guide):
    """``M`` particles per task: ``q_t = (1/M) Σ_m δ(w − w_tm)``.

    State: ``particles`` ``{name: [M, T, *shape]}`` for the adapted weights, drawn from the
    prior ``Normal(μ, σ)`` (reparameterised, so the meta-gradient reaches θ), and ``loc``
    ``{name: [T, *shape]}`` for the shared ones. :meth:`sample` returns the particles, whatever
    number of draws is asked for. An inner step of size ``lr`` is SVGD on the log posterior
    (log likelihood plus log prior, per support point)::

        w_m ← w_m + lr · (1/M) Σ_j [k(w_j, w_m) ∇ log p(w_j | D) + ∇_{w_j} k(w_j, w_m)] / S

    which with one particle is a MAP gradient step. Particles have no density, so their KL is
    taken as 0: the outer objective is the query log predictive of the ensemble.

    Parameters
    ----------
    num_particles : int
        ``M``.
    bandwidth : float, optional
        A fixed RBF bandwidth instead of the median heuristic (see :func:`rbf_kernel`).
    """

    state_type = ParticleState

    def __init__(self, num_particles: int = 5, bandwidth: float | None = None):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive float or None, got {bandwidth!r}")
        self.num_particles = num_particles
        self.max_particles = num_particles
        self.bandwidth = bandwidth

    needs_prior = True

    @classmethod
    def build(cls, particles: int | None = None) -> ParticleGuide:
        """``particles`` particles (default 5)."""
        return cls(5 if particles is None else particles)

    @property
    def own_particles(self) -> int:
        return self.num_particles

    def saved_name(self) -> str | None:
        if self.bandwidth is None:
            return None
        return f"{type(self).__name__}(bandwidth={self.bandwidth:g})"

    def init(self, model, num_tasks, adapt=None, generator=None):
        scales = model.prior_scale()
        if scales is None:
            raise ValueError(
                "ParticleGuide draws its particles from the prior and needs a finite "
                "prior_scale; the model has a flat prior (prior_scale=None)"
            )
        particles, loc = {}, {}
        for name, mu in model.prior_loc().items():
            if adapt is None or name in adapt:
                shape = torch.Size([self.num_particles, num_tasks, *mu.shape])
                particles[name] = mu + scales[name] * standard_normal(shape, mu, generator)
            else:
                loc[name] = _expand(mu, num_tasks)
        return {"particles": particles, "loc": loc}

    def step_bytes(self, model, num_tasks, particles, adapt=None):
        # The particles [M, T, D] and, per weight, the kernel [M, M, T]; the median heuristic
        # also takes the M(M - 1)/2 pairs' indices (int64) and differences [pairs, T, D].
        loc = model.prior_loc()
        sizes = [w.numel() for n, w in loc.items() if adapt is None or n in adapt]
        size, M, T = next(iter(loc.values())).element_size(), particles, num_tasks
        total = M * T * sum(sizes) * size + M * M * T * size
        if self.bandwidth is None and M > 1:
            pairs = M * (M - 1) // 2
            total += pairs * (2 * 8 + T * max(sizes, default=0) * size)
        return total

    @staticmethod
    def num_tasks(state: State) -> int:
        if state["loc"]:
            return next(iter(state["loc"].values())).shape[0]
        return next(iter(state["particles"].values())).shape[1]

    def point_names(self, state):
        return set(state["loc"])

    def sample(self, state, particles=None, generator=None, noise=None):
        out = dict(state["particles"])
        M = next(iter(out.values())).shape[0] if out else self.num_particles
        for name, loc in state.get("loc", {}).items():
            out[name] = loc.unsqueeze(0).expand(M, *loc.shape)
        return out

    def elbo_grads(self, state, prior, names, noise, draw_grads):
        # draw_grads[i] is ∂(NLL/S)/∂w averaged over the M particles: M times it is each
        # particle's own gradient. Returned: minus the SVGD direction, per support point.
        out: State = {"particles": {}}
        for name, gw in zip(names, draw_grads, strict=True):
            w = state["particles"][name]  # [M, T, D]
            grad = gw * w.shape[0]
            if prior.scale is not None:
                grad = grad + prior.weight * (w - prior.loc[name]) / prior.scale[name].square()
            kernel, repulsion = rbf_kernel(w, self.bandwidth)  # [M, M, T], [M, T, D]
            drive = torch.einsum("jmt,jtd->mtd", kernel, grad)
            out["particles"][name] = (drive - prior.weight * repulsion) / w.shape[0]
        return out

    def kl(self, state, model, flat_prior=False, names=None):
        first = next(iter(state["particles"].values()))
        return first.new_zeros(self.num_tasks(state))

    def site(self, state, name):
        raise NotImplementedError(
            "a particle posterior has no per-site density for Pyro; use "
            "TaskPosterior.sample_weights or predict"
        )
