"""JSON descriptions of models, so that checkpoints rebuild them without pickled code."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from bayesmeta.models import Categorical, HierarchicalBNN, Hyperprior, Normal
from bayesmeta.nets import MLP, Conv4

__all__ = ["model_spec", "model_from_spec"]


def _net_spec(net) -> dict[str, Any] | None:
    if type(net) is MLP:
        return {
            "type": "MLP",
            "in_features": net.in_features,
            "hidden": list(net.hidden),
            "out_features": net.out_features,
            "activation": net.activation,
        }
    if type(net) is Conv4:
        return {
            "type": "Conv4",
            "in_channels": net.in_channels,
            "ways": net.ways,
            "hidden": net.hidden,
            "image_size": net.image_size,
            "norm": net.norm,
        }
    return None  # a user's own backbone: load() then needs the model


def model_spec(model: HierarchicalBNN) -> dict[str, Any]:
    """Constructor arguments of ``model`` (its parameter values live in the state dict)."""
    lik = model.likelihood
    if isinstance(lik, Normal):
        lik_spec = {
            "type": "Normal",
            "noise": float(lik.noise.detach()),
            "learn_noise": lik.learn_noise,
        }
    else:
        lik_spec = {"type": type(lik).__name__}
    raw = model.prior_scale_raw()
    hp = model.hyperprior
    return {
        "net": _net_spec(model.net),
        "likelihood": lik_spec,
        "prior_scale": None
        if raw is None
        else float(F.softplus(raw[model.names[0]].detach()).mean()),
        "learn_prior_scale": raw is not None and raw[model.names[0]].requires_grad,
        "hyperprior": None if hp is None else [hp.loc_scale, hp.concentration, hp.rate],
    }


def model_from_spec(spec: dict[str, Any]) -> HierarchicalBNN:
    """Build a fresh model from :func:`model_spec`'s output."""
    net_spec = dict(spec["net"] or {})
    kind = net_spec.pop("type", None)
    nets = {"MLP": MLP, "Conv4": Conv4}
    if kind not in nets:
        raise ValueError(
            "the checkpoint's backbone is not one of bayesmeta's (MLP, Conv4); pass model= with "
            "the same architecture to MetaLearner.load"
        )
    lik_spec = dict(spec["likelihood"])
    lik_kind = lik_spec.pop("type")
    likelihoods = {"Normal": Normal, "Categorical": Categorical}
    if lik_kind not in likelihoods:
        raise ValueError(f"unknown likelihood {lik_kind!r} in checkpoint")
    hp = spec.get("hyperprior")
    return HierarchicalBNN(
        nets[kind](**net_spec),
        likelihoods[lik_kind](**lik_spec),
        prior_scale=spec["prior_scale"],
        learn_prior_scale=spec["learn_prior_scale"],
        hyperprior=None if hp is None else Hyperprior(*hp),
    )
