"""Network outputs under sampled task weights, reusing a shared body's features.

When every weight below the linear head is the same for all particles (a point body: MAML's
adapted weights, ANIL's and ``bayes-head``'s shared body), the body runs once per task and only
the head runs per draw: ``P`` times less work for predictions, and for a body the inner loop
does not adapt, once for all its steps instead of once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from bayesmeta.models import Guide, HierarchicalBNN, State
from bayesmeta.nets import (
    LINEAR_HEAD,
    batched_features,
    batched_forward,
    has_linear_head,
    linear_head,
    local_forward,
)
from bayesmeta.nets.backbone import local_linear

__all__ = ["NetOutputs", "gaussian_outputs", "closed_form_outputs"]


class NetOutputs:
    """The network's outputs at fixed inputs for any draws of the task weights.

    Parameters
    ----------
    model : HierarchicalBNN
    guide, state : the posterior the draws come from (its point weights decide the shortcut)
    x : Tensor ``[T, B, ...]``
    context : Tensor ``[T, S, ...]``, optional; see :func:`bayesmeta.nets.batched_forward`
    moving : weight names that will change between calls (the inner loop's adapted ones); the
        body's features are computed once only if none of them is in the body

    Calling it with draws ``name → [P, T, *shape]`` gives outputs ``[P, T, B, O]``.
    """

    def __init__(
        self,
        model: HierarchicalBNN,
        guide: Guide,
        state: State,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        moving: Collection[str] = (),
    ):
        self.net, self.x, self.context = model.net, x, context
        self.features: torch.Tensor | None = None
        body = [n for n in model.names if n not in LINEAR_HEAD]
        if has_linear_head(model.net) and not set(body) & set(moving):
            points = guide.point_names(state)
            if all(n in points for n in body):
                locs = {n: state["loc"][n] for n in body}  # [T, *shape]
                self.features = batched_features(model.net, locs, x, context=context)

    def __call__(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.features is not None:
            return linear_head(w["head.weight"], w["head.bias"], self.features)
        return batched_forward(self.net, w, self.x, context=self.context)

    def local(
        self,
        loc: Mapping[str, torch.Tensor],
        var: Mapping[str, torch.Tensor],
        particles: int,
        noise: Callable[[torch.Size], torch.Tensor],
    ) -> torch.Tensor:
        """Outputs ``[P, T, B, O]`` by the local reparameterisation trick
        (:func:`~bayesmeta.nets.functional.local_forward`) for weight means ``loc`` and
        variances ``var`` ``[T, *shape]`` by name (names without a variance are points)."""
        if self.features is None:
            return local_forward(
                self.net, loc, var, self.x, noise, particles=particles, context=self.context
            )

        def grouped(t: torch.Tensor | None) -> torch.Tensor | None:  # [T, ...] → [P·T, ...]
            return None if t is None else t.expand(particles, *t.shape).flatten(0, 1)

        T, B, _ = self.features.shape
        weight, bias = (grouped(loc[n]) for n in LINEAR_HEAD)
        weight_var, bias_var = (grouped(var.get(n)) for n in LINEAR_HEAD)
        out = local_linear(grouped(self.features), weight, bias, weight_var, bias_var, noise)
        return out.reshape(particles, T, B, -1)


def gaussian_outputs(guide: Guide, model: HierarchicalBNN) -> bool:
    """Whether ``guide`` gives the outputs' distribution in closed form for ``model`` (a
    Gaussian head under a Normal likelihood: ``guide.marginal``), so that the predictive is
    exact instead of a mixture over draws."""
    return guide.gaussian_marginal(model)


def closed_form_outputs(
    guide: Guide, model: HierarchicalBNN, state: State, outputs: NetOutputs
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The predictive's outputs where the guide gives them without draws: outputs
    ``[1, T, B, O]`` (:meth:`Guide.predictive_outputs`, or a Gaussian head's mean) and, for the
    Gaussian head under a Normal likelihood, the outputs' variance ``[T, B, O]`` around them
    (else ``None``); ``None`` where the predictive is a mixture over draws."""
    if outputs.features is None:
        return None
    exact = guide.predictive_outputs(model, state, outputs.features)
    if exact is not None:
        return exact, None
    if gaussian_outputs(guide, model):
        mean, var = guide.marginal(state, outputs.features)
        return mean.unsqueeze(0), var
    return None
