"""The meta-objective: what θ minimises once the inner loop has adapted a meta-batch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bayesmeta.data import TaskBatch
from bayesmeta.inference.inner import inner_loop
from bayesmeta.inference.methods import Method
from bayesmeta.models import Guide, HierarchicalBNN, State
from bayesmeta.nets import batched_forward

__all__ = ["InnerConfig", "adapt_state", "meta_objective", "reptile_direction"]


@dataclass(frozen=True)
class InnerConfig:
    """Everything the inner loop needs besides data and θ."""

    steps: int
    particles: int
    adapt: tuple[str, ...] | None
    backend: str = "analytic"


def adapt_state(
    model: HierarchicalBNN,
    method: Method,
    guide: Guide,
    config: InnerConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float | Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    *,
    steps: int | None = None,
    first_order: bool | None = None,
    state: State | None = None,
) -> State:
    """Run the method's inner loop on ``x [T, S, ...]``, ``y``; ``steps``, ``first_order`` and
    ``state`` override the configuration (test-time adaptation cuts the graph)."""
    return inner_loop(
        model,
        guide,
        x,
        y,
        steps=config.steps if steps is None else steps,
        lr=lr,
        particles=config.particles,
        first_order=method.first_order if first_order is None else first_order,
        adapt=None if config.adapt is None else list(config.adapt),
        flat_prior=method.flat_prior,
        generator=generator,
        backend=config.backend,
        state=state,
    )


def query_nll(
    model: HierarchicalBNN, guide: Guide, state: State, x, y, particles: int, generator=None
) -> torch.Tensor:
    """Negative log predictive ``−log (1/P) Σ_p p(y | f(x; w_p))``, mean over query, ``[T]``."""
    w = guide.sample(state, particles, generator)
    lp = model.likelihood.log_prob(batched_forward(model.net, w, x), y)  # [P, T, Q]
    return -(torch.logsumexp(lp, 0) - math.log(lp.shape[0])).mean(-1)


def meta_objective(
    model: HierarchicalBNN,
    method: Method,
    guide: Guide,
    batch: TaskBatch,
    config: InnerConfig,
    lr: float | Mapping[str, torch.Tensor],
    kl_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, State]:
    """Per-task meta-loss ``[T]`` and the adapted state.

    ``loss_t = −(1/Q) Σ_q log p̂(y_q | x_q, q_t) + β · KL(q_t ‖ p(w | θ)) / S``, with
    ``β = kl_weight`` (the KL is 0 under a flat prior). For ``outer="reptile"`` the inner loop
    runs on support and query together and the loss is only reported (θ moves by
    :func:`reptile_direction`).
    """
    x, y = batch.support_x, batch.support_y
    if method.outer == "reptile":
        x = torch.cat([x, batch.query_x], 1)
        y = torch.cat([y, batch.query_y], 1)
    state = adapt_state(model, method, guide, config, x, y, lr, generator)
    loss = query_nll(model, guide, state, batch.query_x, batch.query_y, config.particles, generator)
    if not (method.flat_prior or model.flat) and kl_weight:
        loss = loss + kl_weight * guide.kl(state, model) / batch.support_x.shape[1]
    return loss, state


def reptile_direction(model: HierarchicalBNN, state: State) -> dict[str, torch.Tensor]:
    """Reptile's pseudo-gradient ``μ − mean_t w_t`` per weight (so SGD moves μ toward w)."""
    mu = model.prior_loc()
    return {name: (mu[name] - w.mean(0)).detach() for name, w in state["loc"].items()}
