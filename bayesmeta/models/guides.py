"""Guides for task posteriors q_t(w), written against an explicit state.

The inner loop adapts a guide's variational parameters by differentiable gradient steps, so
they are plain tensors with a leading task axis, held in a *state*: ``{field: {name: Tensor
[T, *shape]}}``. Every guide starts at the prior. ``pyro_guide(state)`` turns a state into a Pyro
guide for the model of :class:`~bayesmeta.models.HierarchicalBNN` (for Pyro's ELBOs,
``Predictive`` and friends); ``sample`` and ``kl`` are the same quantities in closed form.

Weights that a method does not adapt (ANIL's body) are *shared*: every task uses θ's mean for
them, the guide pins them there (``loc`` only) and they carry no prior or KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, TypedDict

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from bayesmeta.models.draws import standard_normal
from bayesmeta.models.hierarchical import HierarchicalBNN
from bayesmeta.nets import LINEAR_HEAD, _registry, has_linear_head
from bayesmeta.nets.backbone import has_local_kernel

__all__ = [
    "Guide",
    "NormalGuide",
    "AntitheticNormalGuide",
    "LocalNormalGuide",
    "DeltaGuide",
    "State",
    "Weights",
    "DeltaState",
    "NormalState",
    "Prior",
    "GUIDES",
    "register_guide",
    "guide_name",
    "PRIOR_LOC",
    "task_prior_loc",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: One field of a state: ``{weight name: Tensor [T, *shape]}``.
Weights = dict[str, torch.Tensor]
#: A guide's variational state, ``{field: Weights}``; each guide declares its own fields as a
#: ``TypedDict`` in :attr:`Guide.state_type` (e.g. :class:`NormalState`). Any state may also
#: hold :data:`PRIOR_LOC`, per-task prior means. A plain mapping of tensors, so that it
#: checkpoints, moves between devices and slices by task as it is.
State = dict[str, Weights]


class DeltaState(TypedDict):
    """:class:`DeltaGuide`'s state: each task's weights."""

    loc: Weights


class _NormalFields(TypedDict):
    loc: Weights
    scale_raw: Weights


class NormalState(_NormalFields, total=False):
    """A mean-field Normal's state (:class:`NormalGuide` and its subclasses): means, and the
    inverse softplus of the scales of the adapted weights (pinned weights have none).
    ``scale``, ``softplus(scale_raw)``, is the fused step's cache between inner steps."""

    scale: Weights


@dataclass(frozen=True)
class Prior:
    """What an inner step pulls the task posteriors toward: ``Normal(loc, scale)`` by weight
    name (``scale=None``: flat), and ``weight``, the KL's weight against the negative log
    likelihood in the objective the step descends (``1/S`` per support point).

    ``loc`` holds ``[*shape]`` (θ's means) or ``[T, *shape]`` (per-task means, e.g. a head's
    prior centred on each task's class prototypes) by name; ``scale`` ``[*shape]``.
    """

    loc: Mapping[str, torch.Tensor]
    scale: Mapping[str, torch.Tensor] | None
    weight: float = 1.0


class Guide:
    """A family of task posteriors. Subclasses define the state's fields."""

    #: the ``TypedDict`` of this family's state, ``{field: Weights}`` (the fields :meth:`init`
    #: returns; a test holds every registered guide to its own)
    state_type: ClassVar[type] = State

    #: the number of particles a guide of this family can use (``None``: any)
    max_particles: int | None = None
    #: draws per inner step when a learner is given none (at most :attr:`max_particles`; one
    #: where the predictive needs no draws)
    default_particles: int = 4
    #: the task posterior is found in closed form by :meth:`condition`, not by inner steps
    exact: bool = False
    #: the guide starts at the prior or draws from it, so the model needs a finite prior scale
    needs_prior: bool = False
    #: a point estimate (one value per task, no spread): the outer rules that move points
    #: (Reptile's) need one, and a method whose guide is Bayesian refuses one
    point_estimate: bool = False
    #: :meth:`newton_step` updates the posterior from curvature (natural steps on a linear
    #: head then use the head's exact Gauss-Newton curvature)
    newton_steps: bool = False
    #: the inner loop draws each support point's pre-activations from :meth:`local_moments`
    #: (the local reparameterisation trick) instead of drawing weights; its gradients then
    #: reach :meth:`step` as moments (see :meth:`NormalGuide.step`)
    local_reparameterisation: bool = False
    #: its particles are independent draws of one posterior: how many is a choice of variance
    #: against cost (a benchmark budget may make it), not a part of the posterior
    monte_carlo: bool = False

    @classmethod
    def build(cls, particles: int | None = None) -> Guide:
        """A guide of this class for a learner asked for ``particles`` draws per step
        (``None``: not given). Default: ``cls()``, whatever ``particles`` is."""
        return cls()

    @property
    def own_particles(self) -> int | None:
        """The number of draws this guide always makes, which then sets a learner's
        ``particles`` and ``eval_particles`` (``None``: any number; the default)."""
        return None

    def saved_name(self) -> str | None:
        """A name that rebuilds this guide where its class's registered name would not (e.g.
        one built with options), or ``None`` (the default): a saved learner records it."""
        return None

    def gaussian_marginal(self, model: HierarchicalBNN) -> bool:
        """Whether :meth:`marginal` gives the outputs' exact Gaussian distribution for
        ``model`` (a Gaussian head under a Normal likelihood). Default: no."""
        return False

    def marginal(self, state: State, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs' mean and variance ``[T, B, O]`` at features ``[T, B, F]``, where
        :meth:`gaussian_marginal` holds."""
        raise NotImplementedError(f"{type(self).__name__} has no Gaussian marginal")

    def newton_step(self, state, grad, hess, prior: Prior, step, noisy: bool = False) -> State:
        """A step from the summed negative log likelihood's gradient ``grad`` and curvature
        ``hess`` by name, where :attr:`newton_steps` holds (``noisy``: ``hess`` is an
        estimate that may be negative)."""
        raise NotImplementedError(f"{type(self).__name__} takes no Newton steps")

    def curvature_estimate(
        self, state: State, name: str, noise: torch.Tensor | None, draw_grads: torch.Tensor
    ) -> torch.Tensor:
        """An unbiased estimate ``[T, *shape]`` of ``Σ_p E_q[∂²L/∂w²]`` (the diagonal) from the
        gradients ``draw_grads`` ``[P, T, *shape]`` of ``L`` at the draws of ``name`` made from
        ``noise`` (``None``: the moments, as :meth:`step` takes them), where
        :attr:`newton_steps` holds."""
        raise NotImplementedError(f"{type(self).__name__} has no curvature estimate")

    def local_moments(self, state: State, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The means and standard deviations ``[T, *shape]`` of the weights ``name``, where
        :attr:`local_reparameterisation` holds; the inner loop differentiates through them."""
        raise NotImplementedError(f"{type(self).__name__} has no local moments")

    def local_noise(
        self, particles: int, like: torch.Tensor, generator: torch.Generator | None
    ) -> Callable[[torch.Size], torch.Tensor]:
        """Where :attr:`local_reparameterisation` holds: a source of the pre-activations'
        standard draws, called with shapes ``[P·T, B, *out]`` (particle-major), one layer at a
        time. Default: independent draws."""
        return partial(standard_normal, like=like, generator=generator)

    def init(
        self,
        model: HierarchicalBNN,
        num_tasks: int,
        adapt: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> State:
        """The state at the prior for ``T = num_tasks`` tasks (differentiable in θ); weights
        outside ``adapt`` (default: all adapt) are pinned at θ's mean, shared by the tasks.
        ``generator``: the randomness of a guide that starts from draws (particles)."""
        raise NotImplementedError

    def point_names(self, state: State) -> set[str]:
        """Names whose draws are the same for every particle (a task's point value)."""
        return set()

    @staticmethod
    def check(model: HierarchicalBNN, adapt: Sequence[str] | None = None) -> None:
        """Raise ``ValueError`` naming what is missing unless this guide can fit ``model``
        with the task weights ``adapt`` (default: every guide can)."""

    def hyperparameters(self, model: HierarchicalBNN) -> dict[str, torch.Tensor]:
        """Meta-parameters of this guide's own, by name, at their initial values: a learner
        adds them to ``model.guide_params`` (:meth:`HierarchicalBNN.add_guide_params`), so
        that they are learned, saved and restored with θ. Default: none."""
        return {}

    def closed_form_predictive(self, model: HierarchicalBNN) -> bool:
        """Whether predictions need no draws for ``model`` (an exact or deterministic
        predictive: :meth:`predictive_outputs`, or a Gaussian marginal), so that one draw is
        the default. Default: no."""
        return False

    def predictive_outputs(
        self, model: HierarchicalBNN, state: State, features: torch.Tensor
    ) -> torch.Tensor | None:
        """Outputs ``[1, T, B, O]`` whose likelihood is the exact posterior predictive at the
        shared body's features ``[T, B, F]`` (e.g. the logits of a conjugate head), or ``None``
        where the predictive is a mixture over :meth:`sample`'s draws (the default)."""
        return None

    def step_bytes(
        self,
        model: HierarchicalBNN,
        num_tasks: int,
        particles: int,
        adapt: Sequence[str] | None = None,
    ) -> int:
        """A cheap lower bound on the bytes that one inner step on ``T = num_tasks`` tasks holds
        for this guide's draws of the weights ``adapt`` (default all), without allocating
        anything; learners refuse settings over their memory limit with it. Default: the
        draws ``[P, T, *shape]``, ``P · T · Σ|w|`` values."""
        loc = model.prior_loc()
        weights = sum(w.numel() for n, w in loc.items() if adapt is None or n in adapt)
        size = next(iter(loc.values())).element_size()
        P = particles if self.max_particles is None else min(particles, self.max_particles)
        return P * num_tasks * weights * size

    def natural_grads(self, state: State, grads: State, scale: float = 1.0) -> State:
        """Preconditioned ``grads`` (by field and name, as :meth:`elbo_grads` returns them, of
        ``scale`` times the negative ELBO): the posterior means' gradients of the whole negative
        ELBO times the inverse Fisher information of ``q`` in them (natural-gradient steps), so
        that a step of size 1 moves a mean that the data do not inform straight to the prior's,
        whatever the prior's scale; other fields keep theirs. Point guides return ``grads``."""
        return grads

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
        prior: Prior,
        names: list[str],
        noise: dict[str, torch.Tensor] | None,
        draw_grads: list[torch.Tensor],
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Closed-form gradients of ``L + prior.weight · Σ_t KL(q_t ‖ p)`` for the fields of
        ``names``.

        ``draw_grads[i]`` is ``∂L/∂w`` ``[P, T, *shape]`` at the draws of ``names[i]`` (made
        from ``noise``); the chain rule through the reparameterisation and the KL's gradient are
        written out. The prior is ``Normal(prior.loc, prior.scale)`` by name, or flat when
        ``prior.scale`` is ``None``. Only the names of ``names`` are read, so the inner loop can
        hand in its weights concatenated under one name. A guide that does not override this
        is differentiated by autograd through the whole ELBO instead.
        """
        raise NotImplementedError

    def step(
        self,
        state: State,
        prior: Prior,
        names: list[str],
        noise: dict[str, torch.Tensor] | None,
        draw_grads: list[torch.Tensor],
        lr: float | torch.Tensor,
        first_order: bool = False,
    ) -> State:
        """One plain inner step of the fields of ``names``: ``state − lr · g`` with ``g`` the
        gradients of :meth:`elbo_grads` (arguments as there). ``lr``: a number, or a tensor
        that broadcasts against each field. ``first_order``: ``g`` carries no gradient (only
        the identity path from ``state`` does). Other fields of ``state`` are returned as they
        are."""
        grads = self.elbo_grads(state, prior, names, noise, draw_grads)
        return _descend(state, grads, lr, first_order)

    def natural_step(
        self,
        state: State,
        prior: Prior,
        names: list[str],
        noise: dict[str, torch.Tensor] | None,
        draw_grads: list[torch.Tensor],
        lr: float | torch.Tensor,
        first_order: bool = False,
    ) -> State:
        """One natural-gradient step: :meth:`step` with the gradients preconditioned by
        :meth:`natural_grads` (a plain step where a guide does not precondition)."""
        if type(self).natural_grads is Guide.natural_grads:
            return self.step(state, prior, names, noise, draw_grads, lr, first_order)
        grads = self.elbo_grads(state, prior, names, noise, draw_grads)
        grads = self.natural_grads(state, grads, prior.weight)
        return _descend(state, grads, lr, first_order)

    @classmethod
    def has_closed_form(cls) -> bool:
        """Whether this guide writes out :meth:`elbo_grads`."""
        return cls.elbo_grads is not Guide.elbo_grads

    def kl(
        self,
        state: State,
        model: HierarchicalBNN,
        flat_prior: bool = False,
        names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``KL(q_t ‖ p(w | θ))`` per task, shape ``[T]`` (up to a constant under a flat prior),
        over the task weights ``names`` (default: all that are not pinned)."""
        raise NotImplementedError

    def site(self, state: State, name: str) -> dist.TorchDistribution:
        """q of one weight with batch shape ``[T, 1]`` (the model's plates) and shape as event."""
        raise NotImplementedError

    def pyro_guide(
        self,
        state: State | None = None,
        model: HierarchicalBNN | None = None,
        num_tasks: int | None = None,
        prefix: str = "guide",
    ) -> Callable[..., None]:
        """A Pyro guide with the model's signature
        ``guide(x, y=None, flat_prior=False, context=None, shared=())``.

        Given a ``state``, its sites are that state's posteriors (fixed tensors). Without one it
        is an ordinary trainable Pyro guide for ``num_tasks`` tasks of ``model``: its
        variational parameters are ``pyro.param`` named ``"{prefix}.{field}.{name}"``, initialised
        at the prior, so that ``pyro.infer.SVI(model.model, guide, ...)`` trains them (and θ).
        """
        if state is None:
            if model is None or num_tasks is None:
                raise ValueError(
                    "pyro_guide needs a state, or model= and num_tasks= to make a trainable one"
                )
            init = self.init(model, num_tasks)
            fields = {
                f: {n: t.detach().clone() for n, t in by_name.items()}
                for f, by_name in init.items()
            }

            def current() -> State:
                return {
                    f: {n: pyro.param(f"{prefix}.{f}.{n}", t) for n, t in by_name.items()}
                    for f, by_name in fields.items()
                }

        else:

            def current() -> State:
                return state

        def guide(x: torch.Tensor, y=None, flat_prior=False, context=None, shared=()):
            now = current()
            names = list(now["loc"]) if "loc" in now else list(next(iter(now.values())))
            with pyro.plate("tasks", x.shape[0], dim=-2):
                for name in names:
                    pyro.sample(name, self.site(now, name))

        return guide

    @staticmethod
    def num_tasks(state: State) -> int:
        return next(iter(next(iter(state.values())).values())).shape[0]


#: A state field of per-task prior means ``{name: [T, *shape]}``: where present they stand for
#: θ's ``μ`` of those weights, in the prior's pull and in the KL (a prior that depends on the
#: task's support set, e.g. a classifier's head centred at its class prototypes).
PRIOR_LOC = "prior_loc"


def task_prior_loc(state: State, model: HierarchicalBNN) -> dict[str, torch.Tensor]:
    """The prior means by name: θ's ``μ`` ``[*shape]``; or, where the state holds per-task
    means for some weights (:data:`PRIOR_LOC`), those and θ's expanded, ``[T, *shape]``
    each."""
    own = state.get(PRIOR_LOC)
    if not own:
        return model.prior_loc()
    T = next(iter(own.values())).shape[0]
    return {n: own.get(n, mu.expand(T, *mu.shape)) for n, mu in model.prior_loc().items()}


#: The guides a method may name; ``"auto"`` picks ``"prototype-laplace"`` for a classifier's
#: linear head, ``"gaussian-head"`` for another linear head, else ``"normal"``.
#: :func:`register_guide` adds users' own, as each shipped guide adds itself.
GUIDES: dict[str, type[Guide]] = {}


def register_guide(name: str, guide_class: type[Guide] | None = None):
    """Make a :class:`Guide` subclass nameable: ``MetaLearner(guide=name)``, and learners saved
    with it load without passing it again. Its constructor must work with no arguments.
    Returns ``guide_class``; without it, a class decorator: ``@register_guide("mine")``.
    """
    if guide_class is None:
        return lambda cls: register_guide(name, cls)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty string other than 'auto', got {name!r}")
    if not (isinstance(guide_class, type) and issubclass(guide_class, Guide)):
        raise TypeError(f"guide_class must be a subclass of Guide, got {guide_class!r}")
    return _registry.add(GUIDES, name, guide_class, "guide")


def guide_name(guide_class: type[Guide]) -> str:
    """The name a learner saves for a guide of ``guide_class``: its registered name, else the
    class's own name (which a load then asks for again)."""
    for name, cls in GUIDES.items():
        if cls is guide_class:
            return name
    return guide_class.__name__


def _same_gradients(cls: type[Guide], base: type[Guide]) -> bool:
    """Whether ``cls`` computes its steps' gradients as ``base`` does (so that ``base``'s fused
    :meth:`Guide.step` computes them for it)."""
    return cls.elbo_grads is base.elbo_grads and cls.natural_grads is base.natural_grads


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` (flattened to ``[..., n_i]``) joined along the last axis."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _descend(state: State, grads: State, lr, first_order: bool) -> State:
    """``state − lr · grads`` for the fields and names of ``grads``; others as they are."""
    out = {field: dict(by_name) for field, by_name in state.items()}
    for field, by_name in grads.items():
        for name, g in by_name.items():
            out[field][name] = state[field][name] - lr * (g.detach() if first_order else g)
    return out


def _expand(t: torch.Tensor, num_tasks: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(num_tasks, *t.shape)


#: The field under which :meth:`NormalGuide.step` keeps ``softplus(scale_raw)``.
_SCALE = "scale"


def _without_scale(state: State) -> State:
    """``state`` without the fused step's cached ``softplus(scale_raw)``, which a generic step
    would leave stale."""
    return {f: v for f, v in state.items() if f != _SCALE}


class _NormalStep(torch.autograd.Function):
    """:meth:`NormalGuide.step` of one weight tensor, with its derivative written out.

    Forward, for ``s = softplus(r)``, draw gradients ``gw [P, *lead]`` and standard draws
    ``ε`` (``A = Σ_p gw``, ``B = Σ_p gw·ε``; with ``noise`` ``None``, ``gw`` is ``[A, B]``
    stacked), prior precision ``π = 1/σ²`` (``None``: flat)::

        g_loc = A + c·π·(loc − μ)              g_s = B + c·(π·s − 1/s)
        loc' = loc − lr · g_loc · (s²/c if natural else 1)
        r'   = r − lr · g_s · sigmoid(r)       s' = softplus(r')

    The same numbers as :meth:`NormalGuide.elbo_grads` and :meth:`NormalGuide.natural_grads`
    followed by the update (``tests/inference/test_inner.py`` checks values and gradients).
    The backward is first order only: the meta-gradient runs through it once.
    """

    @staticmethod
    def forward(ctx, loc, raw, scale, gw, noise, mu, precision, lr, c, natural):
        sig = torch.sigmoid(raw)
        if noise is None:  # (the moments themselves)
            a, b = gw[0], gw[1]
        elif gw.shape[0] == 1:  # (one draw: no sums over draws)
            a, b = gw[0], gw[0] * noise[0]
        else:
            a, b = gw.sum(0), (gw * noise).sum(0)
        inv = scale.reciprocal()
        if precision is None:
            diff, g_loc, g_s = None, a, b - c * inv
        else:
            diff = loc - mu
            g_loc = torch.addcmul(a, diff, precision, value=c)
            g_s = b + c * (scale * precision - inv)
        k = scale.square() / c if natural else None
        d_loc = g_loc * k if natural else g_loc
        g_raw = g_s * sig
        new_raw = raw - lr * g_raw
        new_scale = F.softplus(new_raw)
        lr_t = lr if isinstance(lr, torch.Tensor) else None
        ctx.save_for_backward(
            scale, inv, sig, g_loc, g_s, d_loc, g_raw, noise, diff, precision, k, new_raw, lr_t
        )
        ctx.c, ctx.natural, ctx.lr = c, natural, lr
        ctx.mu_shape = None if mu is None else mu.shape
        return loc - lr * d_loc, new_raw, new_scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u_loc, u_raw, u_scale):
        scale, inv, sig, g_loc, g_s, d_loc, g_raw, noise, diff, precision, k, new_raw, lr_t = (
            ctx.saved_tensors
        )
        c, natural = ctx.c, ctx.natural
        lr = ctx.lr if lr_t is None else lr_t
        need = ctx.needs_input_grad
        if u_loc is None:
            u_loc = torch.zeros_like(g_loc)
        u_raw = torch.zeros_like(g_raw) if u_raw is None else u_raw
        if u_scale is not None:  # s' = softplus(r')
            u_raw = torch.addcmul(u_raw, u_scale, torch.sigmoid(new_raw))
        v_loc, v_raw = u_loc * -lr, u_raw * -lr  # of d_loc, g_raw
        w_loc = v_loc * k if natural else v_loc  # of g_loc
        w_s = v_raw * sig  # of g_s
        grads = [None] * 10
        if need[0]:
            grads[0] = u_loc if precision is None else torch.addcmul(u_loc, w_loc, precision * c)
        if need[1]:  # through sigmoid(r) = sig, whose derivative is sig·(1 − sig)
            grads[1] = u_raw + w_s * g_s * (1 - sig)
        if need[2]:
            pull = inv.square() if precision is None else precision + inv.square()
            g = w_s * c * pull
            grads[2] = torch.addcmul(g, v_loc, g_loc * scale, value=2 / c) if natural else g
        if need[3] and noise is None:
            grads[3] = torch.stack([w_loc, w_s])
        elif need[3]:
            grads[3] = torch.addcmul(w_loc.unsqueeze(0), w_s.unsqueeze(0), noise)
        if precision is not None and need[5]:
            grads[5] = (w_loc * (-c) * precision).sum_to_size(ctx.mu_shape)
        if precision is not None and need[6]:
            grads[6] = (c * torch.addcmul(w_loc * diff, w_s, scale)).sum_to_size(precision.shape)
        if need[7]:
            grads[7] = -torch.addcmul(u_loc * d_loc, u_raw, g_raw).sum_to_size(lr_t.shape)
        return tuple(grads)


def _moments(draw_grads: torch.Tensor, noise: torch.Tensor | None):
    """``Σ_p g`` and ``Σ_p g·ε`` of draw gradients ``[P, *lead]`` (given as they are, stacked,
    where ``noise`` is ``None``: see :meth:`NormalGuide.step`)."""
    if noise is None:
        return draw_grads[0], draw_grads[1]
    return draw_grads.sum(0), (draw_grads * noise).sum(0)


@register_guide("normal")
class NormalGuide(Guide):
    """Mean-field Normal: ``q_t(w) = Normal(loc_t, softplus(scale_raw_t))`` per weight.

    State fields ``loc`` and ``scale_raw``, each ``[T, *shape]``, initialised at (μ, σ); a
    pinned (shared) weight has a ``loc`` and no ``scale_raw``.
    """

    state_type = NormalState

    needs_prior = True
    newton_steps = True
    monte_carlo = True

    def init(self, model: HierarchicalBNN, num_tasks: int, adapt=None, generator=None) -> State:
        raw = model.prior_scale_raw()
        if raw is None:
            raise ValueError(
                "NormalGuide starts at the prior and needs a finite prior_scale; the model has a "
                "flat prior (prior_scale=None). Use DeltaGuide, or give the model a prior_scale"
            )
        return {
            "loc": {k: _expand(v, num_tasks) for k, v in model.prior_loc().items()},
            "scale_raw": {
                k: _expand(v, num_tasks) for k, v in raw.items() if adapt is None or k in adapt
            },
        }

    def point_names(self, state):
        return set(state["loc"]) - set(state["scale_raw"])

    def noise(self, state, particles, generator=None):
        return {
            name: standard_normal(torch.Size([particles, *loc.shape]), loc, generator)
            for name, loc in state["loc"].items()
            if name in state["scale_raw"]
        }

    def sample(self, state, particles, generator=None, noise=None):
        if noise is None:
            noise = self.noise(state, particles, generator)
        raws = state["scale_raw"]
        return {
            name: torch.addcmul(loc, noise[name], self._scale(state, name))
            if name in raws
            else loc.unsqueeze(0).expand(particles, *loc.shape)
            for name, loc in state["loc"].items()
        }

    @staticmethod
    def _scale(state: State, name: str) -> torch.Tensor:
        """``softplus(scale_raw)``, or the copy :meth:`step` keeps of it (field ``"scale"``)."""
        cached = state.get(_SCALE, {}).get(name)
        return F.softplus(state["scale_raw"][name]) if cached is None else cached

    def step(self, state, prior, names, noise, draw_grads, lr, first_order=False):
        if self._generic(first_order):
            state = _without_scale(state)
            return super().step(state, prior, names, noise, draw_grads, lr, first_order)
        return self._fused_step(state, prior, names, noise, draw_grads, lr, False)

    def natural_step(self, state, prior, names, noise, draw_grads, lr, first_order=False):
        if self._generic(first_order):
            state = _without_scale(state)
            return super().natural_step(state, prior, names, noise, draw_grads, lr, first_order)
        return self._fused_step(state, prior, names, noise, draw_grads, lr, True)

    def _generic(self, first_order: bool) -> bool:
        """Whether a step takes the generic path: first order (the fused backward is for
        second-order meta-gradients), or a subclass with gradients of its own."""
        return first_order or not _same_gradients(type(self), NormalGuide)

    def _fused_step(self, state, prior, names, noise, draw_grads, lr, natural: bool) -> State:
        # ``noise`` None: each of ``draw_grads`` is ``[Σ_p g, Σ_p g·ε]`` stacked, the gradients
        # in the weights' means and scales that the local reparameterisation gives directly.
        # One autograd node per step instead of some twenty: the elementwise arithmetic of
        # the step, not the network, was most of a bayes meta-step on the sinusoid MLP, in the
        # inner loop and again in the meta-gradient's backward (docs/performance.md). The
        # result keeps softplus(scale_raw) under "scale" for the next step's draws. A subclass
        # with gradients of its own gets the generic steps, which call them.
        out = {field: dict(by_name) for field, by_name in state.items()}
        out.setdefault(_SCALE, {})
        for name, gw in zip(names, draw_grads, strict=True):
            precision = None if prior.scale is None else prior.scale[name].pow(-2)
            mu = None if prior.scale is None else prior.loc[name]
            loc, raw, scale = _NormalStep.apply(
                state["loc"][name], state["scale_raw"][name], self._scale(state, name), gw,
                None if noise is None else noise[name], mu, precision, lr, prior.weight, natural,
            )  # fmt: skip
            out["loc"][name], out["scale_raw"][name], out[_SCALE][name] = loc, raw, scale
        return out

    def natural_grads(self, state, grads, scale=1.0):
        # The Fisher information of Normal(loc, s) in loc is 1/s², so the prior's pull on loc,
        # (loc − μ)/σ², becomes (s/σ)²·(loc − μ): well-conditioned however small σ is, where a
        # plain step of size lr multiplies the distance to μ by 1 − lr/(σ²S) and diverges
        # once that is below −1. The scale keeps its plain gradient: in raw = softplus⁻¹(s) the
        # prior's pull is not stiff (∂s/∂raw = sigmoid(raw) ≈ s for small s), and its Fisher
        # step, (s/sigmoid(raw))²/2 times the reparameterised gradient E[g·ε], blew up
        # with a few particles (docs/methods.md, "Measured choices behind the defaults").
        out: State = {"loc": {}, "scale_raw": dict(grads["scale_raw"])}
        for name, g in grads["loc"].items():
            out["loc"][name] = g * F.softplus(state["scale_raw"][name]).square() / scale
        return out

    def newton_step(self, state, grad, hess, prior, step, noisy=False):
        """One natural-gradient step in the Gaussian's natural parameters given the summed
        negative log likelihood's expected gradient ``grad`` and curvature ``hess`` at the
        draws (variational online Newton, Khan et al. 2018), for every name of ``grad``::

            b         = 1/σ² + hess
            precision ← (1 − step) / s² + step · b
            loc       ← loc − step · (grad + (loc − μ)/σ²) / precision

        ``step = 1`` is a Newton step to the Laplace-like fit at the current draws. The
        precision stays positive for ``step`` in (0, 1] where ``hess ≥ 0`` (a Gauss-Newton
        curvature). ``noisy``: ``hess`` is an estimate of any sign (one draw's), and the
        precision gains ``step² · (1/s² − b)² / (2/s²)``, which keeps it above half of ``1/s²``
        (the Riemannian correction of Lin et al. 2020, as in IVON). A flat prior drops
        ``1/σ²``. Other fields of ``state`` are kept, but for the step's cached scales.
        """
        out = {f: dict(v) for f, v in state.items() if f != _SCALE}
        for name, g in grad.items():
            loc, raw = state["loc"][name], state["scale_raw"][name]
            if prior.scale is None:
                prior_precision, pull = 0.0, g
            else:
                prior_precision = prior.scale[name].square().reciprocal()
                pull = g + (loc - prior.loc[name]) * prior_precision
            variance, target = F.softplus(raw).square(), prior_precision + hess[name]
            precision = (1 - step) / variance + step * target
            if noisy:
                gap = (1 / variance - target).square()
                precision = precision + (step * step / 2) * variance * gap
            out["loc"][name] = loc - step * pull / precision
            scale = precision.rsqrt()
            out["scale_raw"][name] = scale + torch.log(-torch.expm1(-scale))  # softplus⁻¹
        return out

    def curvature_estimate(self, state, name, noise, draw_grads):
        # Price's theorem: E[∂²L/∂w²] = E[∂L/∂w · ε]/s for w = m + s·ε (as IVON estimates it).
        return _moments(draw_grads, noise)[1] / self._scale(state, name)

    def elbo_grads(self, state, prior, names, noise, draw_grads):
        # Written out because autograd through the sampling and the KL costs more than these
        # few lines on the inner loop's hot path, and its double backward more still
        # (docs/performance.md, "Guides' arithmetic").
        out: State = {"loc": {}, "scale_raw": {}}
        for name, gw in zip(names, draw_grads, strict=True):
            loc, raw = state["loc"][name], state["scale_raw"][name]
            scale = F.softplus(raw)
            (g_loc, g_scale), c = _moments(gw, None if noise is None else noise[name]), prior.weight
            if prior.scale is None:
                g_scale = g_scale - c / scale  # the negative entropy's gradient
            else:
                var = prior.scale[name].square()
                g_loc = g_loc + c * (loc - prior.loc[name]) / var
                g_scale = g_scale + c * (scale / var - 1 / scale)
            out["loc"][name] = g_loc
            out["scale_raw"][name] = g_scale * torch.sigmoid(raw)  # softplus' = sigmoid
        return out

    def kl(self, state, model, flat_prior=False, names=None):
        # Closed forms written out, over all weights at once: torch.distributions' argument
        # checks, and a pass per weight tensor, cost more than the arithmetic on the
        # meta-step's path.
        keep = [n for n in state["scale_raw"] if names is None or n in names]
        if not keep:
            return 0.0
        T = self.num_tasks(state)
        scale = F.softplus(_flat([state["scale_raw"][n].reshape(T, -1) for n in keep]))
        prior_raw = model.prior_scale_raw()
        if flat_prior or prior_raw is None:
            # KL to an improper flat prior is the negative entropy (up to a constant).
            return -(0.5 + _HALF_LOG_2PI + scale.log()).sum(1)
        sigma = F.softplus(_flat([prior_raw[n].reshape(-1) for n in keep]))
        prior_loc = task_prior_loc(state, model)
        lead = (T,) if PRIOR_LOC in state else ()  # (per-task means: [T, D] throughout)
        mu = _flat([prior_loc[n].reshape(*lead, -1) for n in keep])
        loc = _flat([state["loc"][n].reshape(T, -1) for n in keep])
        ratio = scale / sigma
        kl = 0.5 * (ratio.square() + ((loc - mu) / sigma).square() - 1) - ratio.log()
        return kl.sum(1)

    def site(self, state, name):
        loc = state["loc"][name]
        if name not in state["scale_raw"]:
            return dist.Delta(loc.unsqueeze(1), event_dim=loc.dim() - 1)
        scale = F.softplus(state["scale_raw"][name])
        return dist.Normal(loc.unsqueeze(1), scale.unsqueeze(1)).to_event(loc.dim() - 1)


@register_guide("normal-antithetic")
class AntitheticNormalGuide(NormalGuide):
    """:class:`NormalGuide` with antithetic draws: the draws come in pairs ``m ± s·ε``.

    The pair's mean is exactly ``m`` and the part of each gradient that is linear in ``ε``
    cancels within a pair, so two draws carry more than two independent ones where the loss is
    nearly quadratic over the posterior's width (Owen 2013, ch. 8.2). An odd number of draws
    has one unpaired draw. Unbiased as independent draws are. Two draws per inner step by
    default.

    Only the inner loop's draws are paired (:meth:`noise`): :meth:`sample` without ``noise``,
    as predictions and posterior diagnostics call it, draws independently, since ArviZ's
    effective sample sizes and R-hat assume independent draws. The Pyro ELBO
    (``elbo="pyro"``) draws its own, independent ones.
    """

    default_particles = 2

    def noise(self, state, particles, generator=None):
        half = (particles + 1) // 2
        paired = super().noise(state, half, generator)
        return {n: torch.cat([e, -e])[:particles] for n, e in paired.items()}

    def sample(self, state, particles, generator=None, noise=None):
        if noise is None:
            noise = NormalGuide.noise(self, state, particles, generator)
        return super().sample(state, particles, generator, noise)


@register_guide("normal-local")
class LocalNormalGuide(NormalGuide):
    """:class:`NormalGuide` fit with the local reparameterisation trick (Kingma et al. 2015) and
    antithetic draws.

    In the inner loop each support point draws its layers' pre-activations from their Gaussian
    given the layer's input (:func:`~bayesmeta.nets.functional.local_forward`), which in
    distribution is each point drawing its own weights: the expected loss and its gradients in
    the means and scales are those of weight draws, but the points' noise averages out within
    a step. The draws come in pairs ``±ε`` (as :class:`AntitheticNormalGuide`'s weights do), so
    the part of each gradient that is linear in them cancels; two per inner step by default, an
    odd number has one unpaired. Predictions and diagnostics draw weights (:meth:`sample`),
    independently, as the Normal guide does. The analytic ELBO only (``elbo="pyro"`` draws
    weights). Backbones with a local kernel
    (:func:`~bayesmeta.nets.backbone.has_local_kernel`: ``MLP``, ``Conv4`` but for TaskNorm),
    or any backbone with a linear head when only the head adapts.
    """

    default_particles = 2
    local_reparameterisation = True

    def local_noise(self, particles, like, generator):
        half = (particles + 1) // 2

        def paired(shape: torch.Size) -> torch.Tensor:
            tasks = shape[0] // particles
            e = standard_normal((half * tasks, *shape[1:]), like, generator)
            return torch.cat([e, -e])[: shape[0]]

        return paired

    def local_moments(self, state, name):
        return state["loc"][name], self._scale(state, name)

    @staticmethod
    def check(model: HierarchicalBNN, adapt: Sequence[str] | None = None) -> None:
        spread = set(model.names) if adapt is None else set(adapt)
        head_only = has_linear_head(model.net) and spread <= set(LINEAR_HEAD)
        if has_local_kernel(model.net) or head_only:
            return
        raise ValueError(
            "LocalNormalGuide needs a backbone with a local kernel (MLP, Conv4 without "
            f"TaskNorm), or adapt= the linear head only; got {type(model.net).__name__} "
            f"adapting {sorted(spread)}"
        )


@register_guide("delta")
class DeltaGuide(Guide):
    """Point estimate ``q_t(w) = δ(w − loc_t)``; state field ``loc`` ``[T, *shape]`` from μ.

    With a flat prior this is MAML's adaptation; with the learned Gaussian prior it is MAP
    adaptation. Its draws are deterministic, so it uses one particle.
    """

    state_type = DeltaState

    max_particles = 1
    point_estimate = True

    def init(self, model: HierarchicalBNN, num_tasks: int, adapt=None, generator=None) -> State:
        return {"loc": {k: _expand(v, num_tasks) for k, v in model.prior_loc().items()}}

    def point_names(self, state):
        return set(state["loc"])

    def sample(self, state, particles, generator=None, noise=None):
        return {name: loc.unsqueeze(0) for name, loc in state["loc"].items()}

    def step(self, state, prior, names, noise, draw_grads, lr, first_order=False):
        # Guide.step's numbers in fewer passes over [T, D] (each pass, and its backward and
        # double-backward nodes, is a measurable share of a small network's meta-step): one
        # draw needs no sum over draws, and a number as step size joins the update.
        if not _same_gradients(type(self), DeltaGuide):
            return super().step(state, prior, names, noise, draw_grads, lr, first_order)
        out = {field: dict(by_name) for field, by_name in state.items()}
        for name, gw in zip(names, draw_grads, strict=True):
            loc = state["loc"][name]
            g = gw[0] if gw.shape[0] == 1 else gw.sum(0)
            if prior.scale is not None:
                pull = prior.scale[name].pow(-2)
                g = torch.addcmul(g, loc - prior.loc[name], pull, value=prior.weight)
            if first_order:
                g = g.detach()
            if isinstance(lr, (int, float)):
                out["loc"][name] = torch.add(loc, g, alpha=-lr)
            else:
                out["loc"][name] = loc - lr * g
        return out

    def elbo_grads(self, state, prior, names, noise, draw_grads):
        out: State = {"loc": {}}
        for name, gw in zip(names, draw_grads, strict=True):
            g = gw.sum(0)
            if prior.scale is not None:  # −log N(w; μ, σ) contributes (w − μ)/σ²
                var = prior.scale[name].square()
                g = g + prior.weight * (state["loc"][name] - prior.loc[name]) / var
            out["loc"][name] = g
        return out

    def kl(self, state, model, flat_prior=False, names=None):
        T = self.num_tasks(state)
        first = next(iter(state["loc"].values()))
        if flat_prior or model.flat:
            return first.new_zeros(T)
        # −log N(w; μ, σ) written out, with θ read once: the distributions' construction and
        # checks cost more than the arithmetic on the meta-step's path.
        locs, scales = task_prior_loc(state, model), model.prior_scale()
        total = first.new_zeros(T)
        for name, loc in state["loc"].items():
            if names is None or name in names:
                scale = scales[name]
                nlp = 0.5 * ((loc - locs[name]) / scale).square() + scale.log() + _HALF_LOG_2PI
                total = total + nlp.flatten(1).sum(1)
        return total

    def site(self, state, name):
        loc = state["loc"][name]
        return dist.Delta(loc.unsqueeze(1), event_dim=loc.dim() - 1)
