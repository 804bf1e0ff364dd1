"""The one batched, differentiable inner loop.

Every algorithm adapts its task posteriors here: K gradient steps on the negative ELBO of the
support set, for all T tasks of a meta-batch at once. The ELBO of the meta-batch is a sum over
tasks, so one gradient of it hands each task its own gradient. Per step (per support point)::

    state ← state − lr ⊙ ∇_state  Σ_t [ −E_q log p(y_t | f(x_t; w)) + KL(q_t ‖ p(w | θ)) ] / S

``create_graph=True`` keeps the steps differentiable in θ (second order); ``first_order=True``
cuts the graph at each gradient (FOMAML, Reptile).

Two ELBO backends compute the same number: ``"pyro"`` runs Pyro's ``TraceMeanField_ELBO`` on the
model and the guide (any model), ``"analytic"`` evaluates the same expectation directly with the
analytic KL and the same random draws. The second is about 3× faster on the sinusoid MLP
(13.5 ms vs 4.5 ms a step, T=25, P=4, this 2-core CPU), so it is the default;
``tests/inference/test_inner.py`` proves the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import torch

from bayesmeta.models import Guide, HierarchicalBNN, State
from bayesmeta.nets import batched_forward

__all__ = ["neg_elbo", "inner_loop", "ELBO_BACKENDS"]

ELBO_BACKENDS = ("analytic", "pyro")


def neg_elbo(
    model: HierarchicalBNN,
    guide: Guide,
    state: State,
    x: torch.Tensor,
    y: torch.Tensor,
    particles: int,
    flat_prior: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "analytic",
) -> torch.Tensor:
    """Negative ELBO of a meta-batch, summed over tasks (a differentiable scalar).

    Parameters
    ----------
    state : guide state, each tensor ``[T, *shape]``
    x : Tensor ``[T, S, ...]``;  y : Tensor ``[T, S]`` or ``[T, S, D]``
    particles : int, ``P`` reparameterised draws (vectorised)
    backend : ``"analytic"`` or ``"pyro"`` (the latter draws from the global torch RNG)
    """
    if backend == "pyro":
        elbo = pyro.infer.TraceMeanField_ELBO(
            num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=2
        )
        return elbo.differentiable_loss(model.model, guide.pyro_guide(state), x, y, flat_prior)
    if backend != "analytic":
        raise ValueError(f"backend must be one of {ELBO_BACKENDS}, got {backend!r}")
    loglik = _expected_loglik(model, guide.sample(state, particles, generator), x, y)
    return (guide.kl(state, model, flat_prior) - loglik).sum()


def _expected_loglik(model: HierarchicalBNN, w, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``E_q log p(y_t | x_t, w)`` per task ``[T]``: summed over points, averaged over the
    draws ``w`` (name → ``[P, T, *shape]``)."""
    f = batched_forward(model.net, w, x)  # [P, T, S, O]
    return model.likelihood.log_prob(f, y).sum(-1).mean(0)


def inner_loop(
    model: HierarchicalBNN,
    guide: Guide,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float | Mapping[str, torch.Tensor],
    particles: int = 1,
    first_order: bool = False,
    adapt: list[str] | None = None,
    flat_prior: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "analytic",
    state: State | None = None,
) -> State:
    """Fit the task posteriors of a meta-batch by ``steps`` SVI steps from the prior.

    Parameters
    ----------
    x : Tensor ``[T, S, ...]``;  y : Tensor ``[T, S]`` or ``[T, S, D]``
    lr : float, or name → Tensor of the parameter's shape (Meta-SGD's learned step sizes)
    adapt : weight names to adapt (ANIL adapts the head only); ``None`` adapts all
    state : start here instead of at the prior

    Returns
    -------
    The adapted state, each tensor ``[T, *shape]``; differentiable in θ unless
    ``first_order``, where only the identity path from the initial state carries gradient.
    """
    if state is None:
        state = guide.init(model, x.shape[0])
    # A state cut from θ (evaluation, frozen θ) still needs gradients of its own.
    state = {
        field: {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in v.items()}
        for field, v in state.items()
    }
    names = list(model.names) if adapt is None else list(adapt)
    support = x.shape[1]
    for _ in range(steps):
        grads = None
        if backend == "analytic":
            grads = _closed_form_grads(
                model, guide, state, x, y, particles, names, flat_prior, generator, first_order
            )
        if grads is None:
            leaves = [(field, name) for field in state for name in names]
            loss = neg_elbo(model, guide, state, x, y, particles, flat_prior, generator, backend)
            values = torch.autograd.grad(
                loss / support,
                [state[f][n] for f, n in leaves],
                create_graph=not first_order,
            )
            grads = {field: {} for field in state}
            for (field, name), g in zip(leaves, values, strict=True):
                grads[field][name] = g
        state = {field: dict(values) for field, values in state.items()}
        for field, by_name in grads.items():
            for name, g in by_name.items():
                step = lr[name] if isinstance(lr, Mapping) else lr
                state[field][name] = state[field][name] - step * g
    return state


def _closed_form_grads(
    model, guide, state, x, y, particles, names, flat_prior, generator, first_order
):
    """One inner step's gradients of the negative ELBO / S with autograd through the network only.

    The same numbers as differentiating :func:`neg_elbo` (same draws, same expectation), but the
    reparameterisation and the KL are differentiated by :meth:`Guide.elbo_grads` in closed form,
    so the graph that second-order meta-gradients run back through is much smaller. ``None``
    when the guide has no closed form.
    """
    noise = guide.noise(state, particles, generator)
    w = guide.sample(state, particles, generator, noise=noise)
    support = x.shape[1]
    nll = -_expected_loglik(model, w, x, y).sum() / support
    draw_grads = torch.autograd.grad(nll, [w[n] for n in names], create_graph=not first_order)
    grads = guide.elbo_grads(state, model, names, noise, list(draw_grads), 1 / support, flat_prior)
    if grads is not None and first_order:
        grads = {f: {n: g.detach() for n, g in v.items()} for f, v in grads.items()}
    return grads
