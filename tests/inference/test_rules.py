"""Update rules against their definitions written out, per task, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bayesmeta.inference import UPDATE_RULES, InnerConfig, inner_loop
from bayesmeta.inference.rules import VONRule, resolve_update_rule
from bayesmeta.models import DeltaGuide, NormalGuide, Prior
from bayesmeta.models.draws import standard_normal
from tests.inference._exact import (
    NOISE,
    adapted,
    assert_same_values_and_meta_gradients,
    sine_problem,
)


def _problem():
    return sine_problem(5, S=6)


def _von_by_definition(model, x, y, steps, lr, particles, curvature, seed):
    """The VON inner loop for each task on its own: autograd on each draw's negative log
    likelihood, the update of the rule's docstring, the library's random stream."""
    guide = NormalGuide()
    T, S = x.shape[:2]
    g = torch.Generator().manual_seed(seed)
    start = guide.init(model, T)
    mu, sigma = model.prior_loc(), model.prior_scale()
    names = list(model.names)
    m = {n: [mu[n]] * T for n in names}
    s = {n: [sigma[n]] * T for n in names}
    for _ in range(steps):
        noise = guide.noise(start, particles, g)
        eps_y = standard_normal((particles, T, S, 1), x, g) if curvature == "fisher" else None
        for t in range(T):
            grad = {n: 0.0 for n in names}
            hess = {n: 0.0 for n in names}
            for p in range(particles):
                w = {n: m[n][t] + s[n][t] * noise[n][p, t] for n in names}
                f = functional_call(model.net, w, (x[t],))
                nll = -torch.distributions.Normal(f, NOISE).log_prob(y[t]).sum()
                gw = torch.autograd.grad(nll, [w[n] for n in names], create_graph=True)
                if curvature == "fisher":
                    y_hat = f.detach() + NOISE * eps_y[p, t]
                    nll_hat = -torch.distributions.Normal(f, NOISE).log_prob(y_hat).sum()
                    gh = torch.autograd.grad(nll_hat, [w[n] for n in names], create_graph=True)
                for i, n in enumerate(names):
                    grad[n] = grad[n] + gw[i] / particles
                    if curvature == "fisher":
                        hess[n] = hess[n] + gh[i].square() / particles
                    else:
                        hess[n] = hess[n] + gw[i] * noise[n][p, t] / s[n][t] / particles
            for n in names:
                step = lr[n] if isinstance(lr, dict) else lr
                old, b = s[n][t].pow(-2), sigma[n].pow(-2) + hess[n]
                new = (1 - step) * old + step * b
                if curvature == "price":
                    new = new + step**2 * (old - b).square() / (2 * old)
                pull = grad[n] + (m[n][t] - mu[n]) / sigma[n].square()
                m[n][t] = m[n][t] - step * pull / new
                s[n][t] = new.rsqrt()
    return {n: torch.stack(m[n]) for n in names}, {n: torch.stack(s[n]) for n in names}


@pytest.mark.parametrize("curvature", ["fisher", "price"])
@pytest.mark.parametrize("particles", [1, 2])
@pytest.mark.parametrize("learned_lr", [False, True])
def test_von_steps_equal_their_definition_in_value_and_meta_gradient(
    float64, curvature, particles, learned_lr
):
    model, x, y = _problem()
    rule = VONRule(curvature)
    lr = 0.4
    if learned_lr:
        g = torch.Generator().manual_seed(2)
        lr = {n: 0.2 + 0.4 * torch.rand(shape, generator=g) for n, shape in model.shapes().items()}
    state = inner_loop(
        model,
        NormalGuide(),
        x,
        y,
        InnerConfig(steps=3, particles=particles, update=rule),
        lr=lr,
        generator=torch.Generator().manual_seed(5),
    )
    loc, scale = _von_by_definition(model, x, y, 3, lr, particles, curvature, seed=5)
    want = [loc[n] for n in model.names] + [scale[n] for n in model.names]
    # Values, and first derivatives in θ through the unrolled loop.
    assert_same_values_and_meta_gradients(adapted(state, model.names), want, list(model.theta()))


def test_the_riemannian_correction_keeps_the_precision_above_half():
    # One draw's Price estimate can be far below zero; the precision still stays above half
    # its old value, where the uncorrected update would turn negative.
    guide = NormalGuide()
    s = torch.full((2, 3), 0.1)
    state = {"loc": {"w": torch.zeros(2, 3)}, "scale_raw": {"w": s + torch.log(-torch.expm1(-s))}}
    prior = Prior({"w": torch.zeros(3)}, {"w": torch.ones(3)}, 1.0)
    hess = {"w": torch.full((2, 3), -1e4)}
    out = guide.newton_step(state, {"w": torch.ones(2, 3)}, hess, prior, 0.5, noisy=True)
    precision = F.softplus(out["scale_raw"]["w"]).pow(-2)
    assert bool((precision >= 0.5 / s.square()).all())
    plain = 0.5 / s.square() + 0.5 * (1 + hess["w"])
    assert bool((plain < 0).all())  # (what the correction prevents)


def test_rules_refuse_guides_they_cannot_step():
    model, x, y = _problem()
    for name in ("von", "ivon"):
        with pytest.raises(ValueError, match=f"update='{name}' needs a guide that takes Newton"):
            inner_loop(model, DeltaGuide(), x, y, InnerConfig(steps=1, update=name), lr=0.1)
    with pytest.raises(ValueError, match="update must be one of"):
        resolve_update_rule("newton")
    with pytest.raises(ValueError, match="curvature must be 'fisher' or 'price'"):
        VONRule("hessian")
    with pytest.raises(ValueError, match="takes no inner_loss"):
        inner_loop(
            model,
            NormalGuide(),
            x,
            y,
            InnerConfig(steps=1, update="von", loss=lambda f, y: (f - y).square().sum(-1).sum(-1)),
            lr=0.1,
        )
    assert {"gradient", "natural", "von", "ivon"} <= set(UPDATE_RULES)
