"""JSON descriptions of models, so that checkpoints rebuild them without pickled code."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F

from bayesmeta.models import LIKELIHOODS, HierarchicalBNN, Hyperprior
from bayesmeta.nets import BACKBONES
from bayesmeta.nets.backbone import saved_backbone

__all__ = ["model_spec", "model_from_spec"]


def model_spec(model: HierarchicalBNN) -> dict[str, Any]:
    """Constructor arguments of ``model`` (its parameter values live in the state dict)."""
    lik = model.likelihood
    lik_spec = {"type": type(lik).__name__, **lik.spec()}
    raw = model.prior_scale_raw()
    hp = model.hyperprior
    return {
        "net": saved_backbone(model.net),  # None: a user's own, which load() is given
        "likelihood": lik_spec,
        "prior_scale": None
        if raw is None
        else float(F.softplus(raw[model.names[0]].detach()).mean()),
        "learn_prior_scale": raw is not None and raw[model.names[0]].requires_grad,
        "hyperprior": None if hp is None else [hp.loc_scale, hp.concentration, hp.rate],
    }


def check_keys(what: str, given: dict[str, Any], accepted, required=()) -> None:
    """Refuse a description with keys its constructor does not take, or without one it
    needs: ``ValueError`` naming them (rather than a ``TypeError`` from deep in a call)."""
    unknown = sorted(set(given) - set(accepted))
    missing = sorted(set(required) - set(given))
    if unknown or missing:
        problems = [f"unknown keys {unknown}"] if unknown else []
        problems += [f"missing keys {missing}"] if missing else []
        raise ValueError(
            f"the checkpoint's description of its {what} has {' and '.join(problems)} "
            f"(expected keys {sorted(accepted)}); it was written by another version of "
            "bayesmeta, or edited"
        )


def constructor_arguments(cls) -> tuple[list[str], list[str]]:
    """A constructor's keyword arguments: all of them, and those without a default."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    names = [
        p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
    ]
    return names, [p.name for p in params if p.name in names and p.default is p.empty]


def model_from_spec(spec: dict[str, Any]) -> HierarchicalBNN:
    """Build a fresh model from :func:`model_spec`'s output (``ValueError`` for a description
    this version cannot build)."""
    if not isinstance(spec, dict):
        raise ValueError(f"the checkpoint's model description must be a dict, got {spec!r}")
    check_keys("model", spec, _SPEC_KEYS, required=_SPEC_KEYS[:4])
    net_spec = dict(spec["net"] or {})
    kind = net_spec.pop("type", None)
    nets = BACKBONES
    if kind not in nets:
        raise ValueError(
            f"the checkpoint's backbone is not one of bayesmeta's ({', '.join(nets)}); pass "
            "model= with the same architecture to MetaLearner.load"
        )
    check_keys(f"{kind} backbone", net_spec, *constructor_arguments(nets[kind]))
    lik_spec = dict(spec["likelihood"])
    lik_kind = lik_spec.pop("type", None)
    likelihoods = LIKELIHOODS
    if lik_kind not in likelihoods:
        raise ValueError(
            f"the checkpoint's likelihood {lik_kind!r} is not one of bayesmeta's "
            f"({', '.join(likelihoods)}); pass model= with the same likelihood to "
            "MetaLearner.load"
        )
    check_keys(f"{lik_kind} likelihood", lik_spec, *constructor_arguments(likelihoods[lik_kind]))
    hp = spec.get("hyperprior")
    if hp is not None and (not isinstance(hp, list) or len(hp) != 3):
        raise ValueError(
            f"the checkpoint's hyperprior must be [loc_scale, concentration, rate], got {hp!r}"
        )
    return HierarchicalBNN(
        nets[kind](**net_spec),
        likelihoods[lik_kind](**lik_spec),
        prior_scale=spec["prior_scale"],
        learn_prior_scale=spec["learn_prior_scale"],
        hyperprior=None if hp is None else Hyperprior(*hp),
    )


_SPEC_KEYS = ("net", "likelihood", "prior_scale", "learn_prior_scale", "hyperprior")
