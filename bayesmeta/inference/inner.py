"""The one batched, differentiable inner loop.

Every algorithm adapts its task posteriors here: K gradient steps on the negative ELBO of the
support set, for all T tasks of a meta-batch at once. The ELBO of the meta-batch is a sum over
tasks, so one gradient of it hands each task its own gradient. Per step (per support point)::

    state ← state − lr ⊙ ∇_state  Σ_t [ −E_q log p(y_t | f(x_t; w)) + KL(q_t ‖ p(w | θ)) ] / S

with a plain step's ``lr`` measured in the likelihood's and the prior's curvature
(:func:`plain_step_size`), so that one step size suits any noise level and any prior scale.

``create_graph=True`` keeps the steps differentiable in θ (second order); ``first_order=True``
cuts the graph at each gradient (FOMAML, Reptile).

Two ELBO backends compute the same number: ``"pyro"`` runs Pyro's ``TraceMeanField_ELBO`` on the
model and the guide (any model), ``"analytic"`` evaluates the same expectation directly with the
analytic KL and the same random draws. The second is several times faster on the sinusoid MLP
(docs/performance.md, "The analytic ELBO"), so it is the default;
``tests/inference/test_inner.py`` proves the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import pyro
import torch

from bayesmeta.inference._checks import check_int, check_log_prob
from bayesmeta.inference.forward import NetOutputs
from bayesmeta.inference.rules import (
    UPDATE_RULES,
    GradientRule,
    StepInputs,
    UpdateRule,
    resolve_update_rule,
)
from bayesmeta.models import Guide, HierarchicalBNN, Likelihood, State
from bayesmeta.models.guides import PRIOR_LOC, Prior, task_prior_loc

__all__ = ["InnerConfig", "neg_elbo", "inner_loop", "plain_step_size", "StepSizes", "ELBO_BACKENDS"]

ELBO_BACKENDS = ("analytic", "pyro")


@dataclass(frozen=True)
class InnerConfig:
    """How the inner loop adapts: everything it and the query predictions need besides the
    data, θ and the step size (which Meta-SGD learns, so it travels with θ).

    ``steps``: SVI steps per task. ``particles``: reparameterised draws per step
    (vectorised). ``adapt``: the weight names to adapt (ANIL adapts the head only); ``None``
    adapts all, and the others are shared by the tasks (pinned at θ's mean, no prior).
    ``backend``: ``"analytic"`` or ``"pyro"`` (:data:`ELBO_BACKENDS`; the latter draws from the
    global torch RNG). ``transductive``: queries are normalised with the statistics of their
    own batch instead of the support set's (for comparison with papers; a query's prediction
    then depends on the other queries). ``update``: each step's rule, a name of
    :data:`~bayesmeta.inference.rules.UPDATE_RULES` (``"gradient"``; ``"natural"``:
    preconditioned by the inverse Fisher information of the guide; ``"von"``: variational
    online Newton; the last two for closed-form guides only) or an
    :class:`~bayesmeta.inference.rules.UpdateRule`. ``loss``: ``loss(outputs, y)`` in place of
    the negative log likelihood of the support set: network outputs ``[P, T, S, O]`` and the
    targets as given (anything with the task axis first, e.g. actions and advantages of a
    policy-gradient step) to each task's loss, ``[P, T]`` or ``[T]``, summed over its points;
    the KL to the prior is added as usual. ``first_order`` cuts the graph at each gradient
    (FOMAML, Reptile). ``flat_prior`` drops the prior (point estimates). ``head_init``: the
    method's (:class:`~bayesmeta.inference.methods.Method`).
    """

    steps: int = 1
    particles: int = 1
    adapt: tuple[str, ...] | None = None
    backend: str = "analytic"
    transductive: bool = False
    update: UpdateRule = UPDATE_RULES["gradient"]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    first_order: bool = False
    flat_prior: bool = False
    head_init: str = "theta"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, minimum=0)
        check_int("particles", self.particles)
        if self.backend not in ELBO_BACKENDS:
            raise ValueError(f"backend must be one of {ELBO_BACKENDS}, got {self.backend!r}")
        if self.adapt is not None:
            if isinstance(self.adapt, str) or not all(isinstance(n, str) for n in self.adapt):
                raise ValueError(f"adapt must be a list of weight names, got {self.adapt!r}")
            object.__setattr__(self, "adapt", tuple(self.adapt))
        object.__setattr__(self, "update", resolve_update_rule(self.update))

    def context(self, support_x: torch.Tensor) -> torch.Tensor | None:
        """What the queries of tasks with these support inputs are normalised with."""
        return None if self.transductive else support_x


def neg_elbo(
    model: HierarchicalBNN,
    guide: Guide,
    state: State,
    x: torch.Tensor,
    y: torch.Tensor,
    config: InnerConfig = InnerConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Negative ELBO of a meta-batch, summed over tasks (a differentiable scalar), with
    ``config``'s ``particles``, ``backend``, ``adapt``, ``flat_prior`` and ``loss``.

    Parameters
    ----------
    state : guide state, each tensor ``[T, *shape]``
    x : Tensor ``[T, S, ...]``;  y : Tensor ``[T, S]`` or ``[T, S, D]``
    """
    c = config
    adapt = None if c.adapt is None else list(c.adapt)
    shared = [] if adapt is None else [n for n in model.names if n not in adapt]
    if c.backend == "pyro" and PRIOR_LOC in state:
        raise ValueError(
            "the state has per-task prior means (head_init='prototypes' under a prior), which "
            "the Pyro model's prior does not know; use backend='analytic'"
        )
    if c.backend == "pyro" and c.loss is None:
        elbo = pyro.infer.TraceMeanField_ELBO(
            num_particles=c.particles, vectorize_particles=c.particles > 1, max_plate_nesting=2
        )
        guide_fn = guide.pyro_guide(state)
        return elbo.differentiable_loss(model.model, guide_fn, x, y, c.flat_prior, None, shared)
    outputs = NetOutputs(model, guide, state, x)
    f = outputs(guide.sample(state, c.particles, generator))
    return (guide.kl(state, model, c.flat_prior, adapt) + _task_loss(model, f, y, c.loss)).sum()


def _task_loss(model: HierarchicalBNN, f: torch.Tensor, y: torch.Tensor, loss=None):
    """Each task's inner objective ``[T]`` at outputs ``f [P, T, S, O]``: the negative log
    likelihood summed over points, or ``loss(f, y)``, averaged over the draws."""
    if loss is None:
        log_prob = check_log_prob(model.likelihood, model.likelihood.log_prob(f, y), f)
        return -log_prob.sum(-1).mean(0)
    value = loss(f, y)
    if not isinstance(value, torch.Tensor) or value.shape not in (f.shape[:2], f.shape[1:2]):
        raise ValueError(
            f"loss(outputs, y) must return a Tensor [P, T] or [T] (each task's loss, summed "
            f"over its points) for outputs {tuple(f.shape)}, got "
            f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
        )
    return value.mean(0) if value.dim() == 2 else value


def inner_loop(
    model: HierarchicalBNN,
    guide: Guide,
    x: torch.Tensor,
    y: torch.Tensor,
    config: InnerConfig = InnerConfig(),
    *,
    lr: float | Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    state: State | None = None,
) -> State:
    """Fit the task posteriors of a meta-batch by ``config.steps`` SVI steps from the prior
    (:class:`InnerConfig`; a learner's is ``learner.inner``).

    Parameters
    ----------
    x : Tensor ``[T, S, ...]``;  y : Tensor ``[T, S]`` or ``[T, S, D]``
    lr : float, or name → Tensor of the parameter's shape (Meta-SGD's learned step sizes).
        A plain step's size is preconditioned by :func:`plain_step_size` (under a flat prior
        and a Normal likelihood, a step on half the mean squared error, at any noise level;
        the mean NLL under a Categorical); also with a custom ``loss``;
        other rules' steps take ``lr`` as it is
    state : start here instead of at the prior

    Returns
    -------
    The adapted state, each tensor ``[T, *shape]``; differentiable in θ unless
    ``first_order``, where only the identity path from the initial state carries gradient. A
    guide that fits itself (``guide.exact``, e.g. the Gaussian head's Newton steps) is handed
    the features, ``steps`` and ``min(lr, 1)``; ``update`` does not apply.
    """
    if not isinstance(config, InnerConfig):
        raise TypeError(f"config must be an InnerConfig, got {type(config).__name__}")
    if state is None:
        adapt = None if config.adapt is None else list(config.adapt)
        state = guide.init(model, x.shape[0], adapt, generator)
    return run_inner_loop(model, guide, x, y, state, lr, config, generator)


def run_inner_loop(
    model: HierarchicalBNN,
    guide: Guide,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    lr: float | Mapping[str, torch.Tensor],
    config: InnerConfig,
    generator: torch.Generator | None = None,
) -> State:
    """:func:`inner_loop` from ``state`` with its settings in ``config`` (``steps``,
    ``particles``, ``adapt``, ``backend``, ``update``, ``loss``, ``first_order``,
    ``flat_prior``; the rest is the predictions')."""
    c = config
    names = list(model.names) if c.adapt is None else list(c.adapt)
    if guide.exact:
        if c.loss is not None:
            raise ValueError(f"{type(guide).__name__} fits the likelihood; it takes no loss=")
        outputs = NetOutputs(model, guide, state, x, moving=names)
        if not isinstance(lr, (int, float)):
            raise ValueError(f"{type(guide).__name__} takes one scalar step size, got {type(lr)}")
        return guide.condition(model, state, outputs.features, y, c.steps, min(float(lr), 1.0))
    c.update.check(guide, c.backend)
    if c.update.plain:
        lr = plain_step_size(model, lr, c.flat_prior, names, x.shape[1])
    if c.backend == "analytic" and guide.has_closed_form():
        return _closed_form_loop(model, guide, state, x, y, lr, c, generator)
    if not isinstance(c.update, GradientRule):
        raise ValueError(
            f"a guide without closed-form gradients, or elbo='pyro', takes autograd's plain "
            f"steps; update={c.update.name!r} needs closed-form ones"
        )
    state = {field: {n: _differentiable(t) for n, t in v.items()} for field, v in state.items()}
    support = x.shape[1]
    for _ in range(c.steps):
        leaves = [
            (field, name)
            for field in state
            if field != PRIOR_LOC
            for name in names
            if name in state[field]
        ]
        loss = neg_elbo(model, guide, state, x, y, c, generator)
        values = torch.autograd.grad(
            loss / support, [state[f][n] for f, n in leaves], create_graph=not c.first_order
        )
        state = {field: dict(by_name) for field, by_name in state.items()}
        for (field, name), g in zip(leaves, values, strict=True):
            step = lr[name] if isinstance(lr, Mapping) else lr
            state[field][name] = state[field][name] - step * g
    return state


class StepSizes(dict):
    """Per-weight step sizes ``base · rate`` (Meta-SGD's ``inner_lr · exp(ρ)``): name →
    Tensor of the weight's shape. :func:`plain_step_size` applies the likelihood's unit to
    ``base`` before the product, so that a step of ``base·c`` is the same float32 number as
    one given as that product (1/30 at noise 0.3 is 0.003 to the bit)."""

    def __init__(self, base: float, rates: Mapping[str, torch.Tensor]):
        super().__init__({n: base * r for n, r in rates.items()})
        self.base, self.rates = base, dict(rates)

    def scaled(self, c: float) -> dict[str, torch.Tensor]:
        return {n: (self.base * c) * r for n, r in self.rates.items()}


def plain_step_size(
    model: HierarchicalBNN,
    lr: float | Mapping[str, torch.Tensor],
    flat_prior: bool,
    names: list[str],
    support: int,
) -> float | dict[str, torch.Tensor]:
    """The size of a plain (not natural, not Newton) inner step: ``lr`` divided by the
    per-point curvature that the likelihood's unit and the prior put on each weight,

        ``lr / (1/c + 1/(σ_w² S))``   (``lr·c`` under a flat prior),

    with ``c`` the likelihood's :meth:`~bayesmeta.models.Likelihood.step_scale` (``σ²`` for a
    Normal) and ``σ_w`` the prior scale of the weight. A step size then means the same at any
    noise level, and with ``lr ≤ 1`` the prior's pull ``(w − μ)/(σ_w² S)`` never moves a
    weight past its mean, however small meta-training makes ``σ_w``. A preconditioner: the
    fixed point, the MAP, is unchanged. Returns a float, or name → Tensor of the weight's
    shape."""
    unit = model.likelihood.step_scale()
    if flat_prior or model.flat:
        if isinstance(lr, StepSizes):
            return lr.scaled(unit)
        if isinstance(lr, Mapping):
            return {n: v * unit for n, v in lr.items()}
        return lr * unit
    scales = model.prior_scale()
    step = {}
    for n in names:
        precision = 1 / unit + scales[n].detach().pow(-2) / support
        step[n] = (lr[n] if isinstance(lr, Mapping) else lr) / precision
    return step


def _differentiable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a leaf copy that requires grad: a state cut from θ (evaluation, frozen θ)
    still needs gradients of its own."""
    return t if t.requires_grad else t.detach().requires_grad_()


#: The name the adapted weights are concatenated under in :func:`_closed_form_loop`.
_JOINED = "*"


class _Join:
    """Concatenates tensors ``[*lead, *shape]`` of the adapted weights into one ``[*lead, D]``,
    and splits such a tensor back into views by name."""

    def __init__(self, names: list[str], shapes: Mapping[str, torch.Size]):
        self.names = names
        self.shapes = [shapes[n] for n in names]
        self.sizes = [math.prod(s) for s in self.shapes]

    def join(self, by_name: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [by_name[n] for n in self.names]
        flat = [
            p.reshape(*p.shape[: p.dim() - len(s)], -1)
            for p, s in zip(parts, self.shapes, strict=True)
        ]
        return torch.cat(flat, -1)

    def split(self, joined: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = joined.shape[:-1]
        parts = joined.split(self.sizes, -1)
        return {
            n: p.view(*lead, *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }


def _head_curvature(likelihood, features: torch.Tensor, f: torch.Tensor, join: _Join):
    """Diagonal Gauss-Newton curvature of the summed negative log likelihood in a linear
    head's weight and bias, averaged over the draws: ``Σ_b φ_bf² F_bo`` and ``Σ_b F_bo`` for
    the likelihood's output-space Fisher ``F`` ``[P, T, B, O]`` at outputs ``f``; joined as
    the head's weights are, ``[T, O·F + O]``."""
    fisher = likelihood.output_fisher(f).mean(0)  # [T, B, O]
    weight = torch.einsum("tbf,tbo->tof", features.square(), fisher)
    return join.join({"head.weight": weight, "head.bias": fisher.sum(1)})


@dataclass(frozen=True)
class _Support:
    """What each step of :func:`_closed_form_loop` reads besides the adapted weights."""

    model: HierarchicalBNN
    guide: Guide
    state: State
    y: torch.Tensor
    outputs: NetOutputs
    join: _Join
    fixed: State
    pinned: list[str]
    config: InnerConfig
    generator: torch.Generator | None


def _nll_grads(s: _Support, f: torch.Tensor, wrt: list[torch.Tensor]):
    """Gradients in ``wrt`` of the support set's negative log likelihood at outputs ``f``
    (averaged over draws, divided by the support size), and, for a rule that samples the
    Fisher information, the same at targets drawn from the likelihood (in ``wrt[0]`` only)."""
    c, support = s.config, s.y.shape[1]
    nll = _task_loss(s.model, f, s.y, c.loss).sum() / support
    sampled = None
    if c.update.sampled_fisher:  # (first: the next backward may free the graph)
        if c.loss is not None:
            raise ValueError(
                f"update={c.update.name!r} draws targets from the likelihood; it takes no "
                "inner_loss"
            )
        y_hat = s.model.likelihood.sample(f.detach(), s.generator)
        nll_hat = _task_loss(s.model, f, y_hat).sum() / support
        (sampled,) = torch.autograd.grad(
            nll_hat, wrt[:1], retain_graph=True, create_graph=not c.first_order
        )
    return torch.autograd.grad(nll, wrt, create_graph=not c.first_order), sampled


def _weight_draws(s: _Support, joined: State):
    """One step's weight draws and the gradients at them: the noise (joined), the draws'
    gradients ``[P, T, D]``, the sampled-target gradients and the outputs."""
    c, guide, join = s.config, s.guide, s.join
    # Draws by name, in the state's order: the same random stream as Pyro's sites. They
    # depend on the state's shapes only, so the state at the start serves every step.
    noise = guide.noise(s.state, c.particles, s.generator)
    noise_joined = None if noise is None else {_JOINED: join.join(noise)}
    draws = guide.sample(joined, c.particles, s.generator, noise=noise_joined)[_JOINED]
    w = join.split(draws)
    if s.pinned and s.outputs.features is None:
        fixed_noise = None if noise is None else {n: noise[n] for n in s.pinned if n in noise}
        w.update(guide.sample(s.fixed, c.particles, s.generator, noise=fixed_noise))
    f = s.outputs(w)
    (draw_grad,), sampled = _nll_grads(s, f, [draws])
    return noise_joined, draw_grad, sampled, f


def _local_draws(s: _Support, joined: State):
    """:func:`_weight_draws` by the local reparameterisation trick: the outputs' draws come
    from the weights' moments, and the gradients in the means and scales, ``[Σ g, Σ g·ε]``
    ``[2, T, D]``, stand for the draws' (see :meth:`NormalGuide.step`); no noise."""
    P = s.config.particles
    loc, scale = s.guide.local_moments(joined, _JOINED)
    means = {**s.fixed.get("loc", {}), **s.join.split(loc)}
    noise = s.guide.local_noise(P, loc, s.generator)
    f = s.outputs.local(means, s.join.split(scale.square()), P, noise)
    (g_loc, g_scale), sampled = _nll_grads(s, f, [loc, scale])
    # One sampled gradient per task stands for P draws' (the Fisher's estimate reads Σ_p ĝ_p²).
    sampled = None if sampled is None else sampled.unsqueeze(0) * math.sqrt(P)
    return None, torch.stack([g_loc, g_scale]), sampled, f


def _closed_form_loop(
    model: HierarchicalBNN,
    guide: Guide,
    state: State,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float | Mapping[str, torch.Tensor],
    config: InnerConfig,
    generator: torch.Generator | None,
) -> State:
    """:func:`inner_loop` with autograd through the network only, for a guide that writes out
    :meth:`Guide.elbo_grads`.

    The same numbers as differentiating :func:`neg_elbo` (same draws, same expectation), but the
    reparameterisation and the KL are differentiated in closed form, so the graph that
    second-order meta-gradients run back through is much smaller. The adapted weights are
    concatenated into one ``[T, D]`` tensor per field, so the guide's arithmetic and the update
    run once per step, not once per weight tensor: with the sinusoid MLP's six tensors those
    elementwise calls, not the network, were most of a bayes meta-step on CPU.
    """
    c = config
    names = list(model.names) if c.adapt is None else list(c.adapt)
    join = _Join(names, model.shapes())
    fixed_names = [n for n in model.names if n not in names]
    fixed = {f: {n: v[n] for n in fixed_names if n in v} for f, v in state.items()}
    outputs = NetOutputs(model, guide, state, x, moving=names)
    # The fields that hold the adapted weights move (a field of pinned weights does not).
    joined = {
        field: {_JOINED: _differentiable(join.join(by_name))}
        for field, by_name in state.items()
        if all(n in by_name for n in names)
    }
    support = x.shape[1]
    scales = None if c.flat_prior or model.flat else model.prior_scale()
    prior = Prior(
        {_JOINED: join.join(task_prior_loc(state, model))},
        None if scales is None else {_JOINED: join.join(scales)},
        1 / support,
    )
    step_size = join.join(lr) if isinstance(lr, Mapping) else lr
    # A linear head on a fixed body has an exact Gauss-Newton curvature, which a rule may use
    # (natural steps then update the posterior's precision from it as well as its mean).
    head = (
        c.loss is None
        and outputs.features is not None
        and type(model.likelihood).output_fisher is not Likelihood.output_fisher
    )
    s = _Support(model, guide, state, y, outputs, join, fixed, fixed_names, c, generator)
    local = guide.local_reparameterisation
    for _ in range(c.steps):
        noise, draw_grad, sampled, f = (_local_draws if local else _weight_draws)(s, joined)
        curvature = (
            partial(_head_curvature, model.likelihood, outputs.features, f, join) if head else None
        )
        inputs = StepInputs(
            guide, _JOINED, prior, noise, draw_grad, step_size, c.first_order, support,
            curvature, sampled, local,
        )  # fmt: skip
        joined = c.update.step(joined, inputs)
    # (A guide may keep fields of its own between steps; the state's fields are returned.)
    merged = {f: {**fixed[f], **join.split(v[_JOINED])} for f, v in joined.items() if f in state}
    # In the state's order of fields and names.
    return {f: {n: merged[f][n] for n in v} if f in merged else v for f, v in state.items()}
