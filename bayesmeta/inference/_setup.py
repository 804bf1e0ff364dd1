"""What :class:`~bayesmeta.inference.MetaLearner`'s constructor resolves and refuses: the
method with the user's overrides, the guide and its draws, the options' values, the network's
normalisation, and Meta-SGD's learned step sizes. Each function raises the one clear error of
its argument; the constructor only assigns what they return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from bayesmeta.inference._checks import check_int, check_nonnegative_float, check_positive_float
from bayesmeta.inference.inner import ELBO_BACKENDS, InnerConfig
from bayesmeta.inference.methods import (
    METHODS,
    Method,
    adapted_names,
    check_method,
    resolve_head_init,
    resolve_method,
)
from bayesmeta.inference.rules import resolve_update_rule
from bayesmeta.models import GUIDES, Guide, HierarchicalBNN, guide_name
from bayesmeta.nets import takes_context


def resolve_guide(
    model: HierarchicalBNN,
    method: str,
    guide: str | Guide | type[Guide] | None,
    particles: int | None,
    overrides: dict[str, Any],
) -> tuple[Method, Guide, int | None]:
    """The method (with ``overrides``: first_order, adapt, update, flat_prior, head_init),
    its guide built, and the particles setting the guide implies (``None``: the default).
    A user's guide is saved by its registered name; a point guide under a method that fits
    a Bayesian head is refused."""
    own = _own_guide(guide)  # a Guide instance or class of the user's, or None
    chosen = resolve_method(method, guide=guide if own is None else None, **overrides)
    chosen = resolve_head_init(chosen, model)
    if own is None and chosen.guide == "auto":
        chosen = replace(chosen, guide=_auto_guide(model, chosen.adapt))
    built, particles = _build_guide(own or GUIDES[chosen.guide], particles)
    if METHODS[chosen.name].guide == "auto" and built.point_estimate:
        raise ValueError(
            f"guide={_saved_guide_name(built)!r} contradicts method {chosen.name!r}: the method "
            "fits a Bayesian posterior over the head (its guide is 'auto'), and this guide is a "
            "point estimate; for a point-estimate head use method='anil', or pass a Bayesian "
            "guide"
        )
    if own is not None:
        chosen = replace(chosen, guide=_saved_guide_name(built))
    return chosen, built, particles


def check_guide_fits(
    model: HierarchicalBNN, method: Method, guide: Guide, elbo: str
) -> tuple[str, ...] | None:
    """Refuse a guide or method that ``model`` cannot take, or a guide that the method's
    update rule cannot step with the ELBO backend ``elbo``; the adapted weight names (``None``:
    all of them)."""
    if guide.needs_prior and model.flat:
        raise ValueError(
            f"method {method.name!r} uses a guide that starts at the prior (or draws from it); "
            "the model's prior is flat (prior_scale=None). Give the model a prior_scale"
        )
    names = adapted_names(method.adapt, model.net)
    check_method(method, model)
    guide.check(model, names or model.names)
    if not guide.exact:
        resolve_update_rule(method.update).check(guide, elbo)
    if method.outer.points_only and not guide.point_estimate:
        raise ValueError(
            f"{method.name} moves point estimates: the guide must be a point estimate "
            f"(a DeltaGuide), got {type(guide).__name__}"
        )
    return names


def resolve_particles(
    model: HierarchicalBNN, guide: Guide, particles: int | None, eval_particles: int | None
) -> tuple[int, int]:
    """Draws per inner step and per prediction. Point guides draw one value and an exact
    Gaussian predictive needs none; a guide with draws of its own predicts from all of them."""
    draws = not (guide.max_particles == 1 or guide.closed_form_predictive(model))
    default_p = guide.default_particles if draws else 1
    particles = default_p if particles is None else check_int("particles", particles)
    if guide.max_particles is not None and particles > guide.max_particles:
        raise ValueError(
            f"particles must be at most {guide.max_particles} with a {type(guide).__name__} "
            f"(its draws are all it has), got {particles}"
        )
    eval_p = eval_particles if eval_particles is not None else (16 if draws else 1)
    check_int("eval_particles", eval_p)
    return particles, (particles if guide.own_particles is not None else eval_p)


def check_options(
    inner_steps: Any,
    test_inner_steps: Any,
    elbo: Any,
    weights: dict[str, Any],
    transductive: Any,
    inner_loss: Any,
) -> None:
    """Refuse a bad value of the constructor's simple options (``weights``: name → a weight
    that must be a finite float >= 0)."""
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative int, got {inner_steps!r}")
    if test_inner_steps is not None and (
        isinstance(test_inner_steps, bool)
        or not isinstance(test_inner_steps, int)
        or test_inner_steps < 0
    ):
        raise ValueError(f"test_inner_steps must be a non-negative int, got {test_inner_steps!r}")
    if elbo not in ELBO_BACKENDS:
        raise ValueError(f"elbo must be one of {ELBO_BACKENDS}, got {elbo!r}")
    for name, value in weights.items():
        check_nonnegative_float(name, value)
    if not isinstance(transductive, bool):
        raise ValueError(f"transductive must be a bool, got {transductive!r}")
    if inner_loss is not None and not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable(outputs, y), got {type(inner_loss)}")


def inner_config(
    method: Method,
    steps: int,
    particles: int,
    adapt: tuple[str, ...] | None,
    elbo: str,
    transductive: bool,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> InnerConfig:
    """The inner loop's configuration: the constructor's settings with the method's steps."""
    return InnerConfig(
        steps=steps,
        particles=particles,
        adapt=adapt,
        backend=elbo,
        transductive=transductive,
        update=resolve_update_rule(method.update),
        loss=loss,
        first_order=method.first_order,
        flat_prior=method.flat_prior,
        head_init=method.head_init,
    )


def step_sizes(
    method: Method, guide: Guide, model: HierarchicalBNN, adapt: tuple[str, ...] | None
) -> tuple[nn.ParameterList, list[str]]:
    """Meta-SGD's learned step sizes, one ρ per adapted weight (``adapt``; ``None``: all) on
    the model's device (the step is ``inner_lr · exp(ρ)``, ρ = 0 at the start), and their
    names; none for another method, or for an exact guide, which takes no steps. Learned
    directly, a step size of 0.003 moved by Adam's ~meta_lr = 1e-3 a step grew until the inner
    loop diverged (sinusoid); in log space it moves by ~0.1%."""
    if not method.learn_inner_lr or guide.exact:
        return nn.ParameterList(), []
    names = list(adapt) if adapt is not None else model.names
    loc = model.prior_loc()
    return nn.ParameterList(nn.Parameter(torch.zeros_like(loc[n].detach())) for n in names), names


def resolve_outer(
    method: Method, optimizer: str | None, meta_lr: float | None
) -> tuple[str, float]:
    """The outer optimizer's name and step size: as given, else the method's own step size
    (:attr:`Method.meta_lr`), else its outer rule's."""
    name = optimizer or method.outer.optimizer
    if name not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if meta_lr is None:
        meta_lr = method.outer.meta_lr if method.meta_lr is None else method.meta_lr
    return name, check_positive_float("meta_lr", meta_lr)


def make_optimizer(name: str, params: list[torch.Tensor], meta_lr: float) -> torch.optim.Optimizer:
    """The outer optimizer ``name`` (``"adam"`` or ``"sgd"``) over ``params``."""
    cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    return cls(params, lr=meta_lr)


def check_network(net: nn.Module, transductive: bool) -> None:
    """Refuse, at construction, a network whose normalisation would break the inner loop or
    make a query's prediction depend on the other queries."""
    for name, module in net.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.track_running_stats:
            raise ValueError(
                f"net.{name} is a {type(module).__name__} with running statistics, which are one "
                "set for the network while a meta-step adapts many tasks at once; build it with "
                "track_running_stats=False and give the network's forward a 'context' argument "
                "(the support inputs) to normalise with, as bayesmeta.nets.Conv4 does, or use "
                "nn.GroupNorm / nn.LayerNorm"
            )
        if not transductive and not takes_context(net):
            raise ValueError(
                f"net.{name} normalises every batch with its own statistics, so a query's "
                "prediction would depend on the other queries in its batch; give the network's "
                "forward a 'context' argument (the support inputs) and normalise with its "
                "statistics, as bayesmeta.nets.Conv4 does, or pass transductive=True to compare "
                "with papers that do this"
            )


def _own_guide(guide: object) -> Guide | type[Guide] | None:
    """A guide the user built or named by class (``None`` for a name or no choice)."""
    if guide is None or isinstance(guide, str):
        return None
    if (isinstance(guide, type) and issubclass(guide, Guide)) or isinstance(guide, Guide):
        return guide
    raise TypeError(
        f"guide must be a name of {sorted([*GUIDES, 'auto'])}, a Guide subclass or a Guide "
        f"instance, got {guide!r}"
    )


def _build_guide(guide: Guide | type[Guide], particles: int | None) -> tuple[Guide, int | None]:
    """The guide to use, and the particles setting it implies: a class is built by
    :meth:`Guide.build`; a guide with draws of its own (:attr:`Guide.own_particles`, e.g.
    particles) sets ``particles``, and refuses another number."""
    if isinstance(guide, type):
        if particles is not None:
            check_int("particles", particles)
        guide = guide.build(particles)
    own = guide.own_particles
    if own is None:
        return guide, particles
    if particles is not None and particles != own:
        raise ValueError(
            f"particles={particles} disagrees with the guide's {own} particles; leave "
            "particles out, or build the guide with them"
        )
    return guide, own


def _saved_guide_name(guide: Guide) -> str:
    """The name a learner saves for a user's guide: its registered name when that rebuilds it
    (:meth:`Guide.saved_name` says when it does not), else its class name, which a load asks
    to be given again."""
    return guide.saved_name() or guide_name(type(guide))


def _auto_guide(model: HierarchicalBNN, adapt: str | tuple[str, ...]) -> str:
    """The first of :data:`_AUTO_GUIDES` that can fit ``model``'s adapted weights, else
    ``"normal"``."""
    names = adapted_names(adapt, model.net) or model.names
    for name in _AUTO_GUIDES:
        try:
            GUIDES[name].check(model, names)
        except ValueError:
            continue
        return name
    return "normal"


#: What ``guide="auto"`` tries, in order: a classifier's Laplace head centred on its class
#: prototypes, then the Gaussian head of any linear head.
_AUTO_GUIDES = ("prototype-laplace", "gaussian-head")
