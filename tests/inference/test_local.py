"""The inner loop of LocalNormalGuide against its definition written out per task, in float64."""

import pytest
import torch
import torch.nn.functional as F

from bayesmeta import MetaLearner
from bayesmeta.inference import InnerConfig, inner_loop
from bayesmeta.inference.forward import NetOutputs
from bayesmeta.models import (
    Categorical,
    HierarchicalBNN,
    LocalNormalGuide,
)
from bayesmeta.models.draws import standard_normal
from bayesmeta.nets import Conv4, local_forward
from tests.inference._exact import (
    NOISE,
    adapted,
    assert_same_values_and_meta_gradients,
    sine_problem,
)

LAYERS = ("body.0", "head")


def _problem():
    return sine_problem(4, S=5)


def _draws(shape, like, g):
    """One layer's standard draws ``[P, T, S, O]``, in pairs ``±ε`` over the particles."""
    P, T = shape[:2]
    e = standard_normal(((P + 1) // 2 * T, *shape[2:]), like, g)
    return torch.cat([e, -e])[: P * T].view(shape)


def _by_definition(model, x, y, steps, lr, particles, update, seed):
    """Each task on its own: its layers' pre-activations drawn from Normal(h·m, h²·s²) with the
    library's random stream, autograd in the means and scales, the rule's update."""
    T, S = x.shape[:2]
    g = torch.Generator().manual_seed(seed)
    mu, sigma = model.prior_loc(), model.prior_scale()
    names = list(model.names)
    m = {n: [mu[n]] * T for n in names}
    s = {n: [sigma[n]] * T for n in names}
    for _ in range(steps):
        eps = [_draws((particles, T, S, o), x, g) for o in (4, 1)]
        for t in range(T):
            nll = 0.0
            for p in range(particles):
                h = x[t]
                for i, layer in enumerate(LAYERS):
                    w, b = f"{layer}.weight", f"{layer}.bias"
                    mean = h @ m[w][t].T + m[b][t]
                    var = h.square() @ s[w][t].square().T + s[b][t].square()
                    h = mean + var.sqrt() * eps[i][p, t]
                    h = torch.relu(h) if i == 0 else h
                nll = nll - torch.distributions.Normal(h, NOISE).log_prob(y[t]).sum() / particles
            grads = torch.autograd.grad(
                nll, [m[n][t] for n in names] + [s[n][t] for n in names], create_graph=True
            )
            for i, n in enumerate(names):
                g_m, g_s = grads[i], grads[len(names) + i]
                loc, scale, prec = m[n][t], s[n][t], sigma[n].pow(-2)
                if update == "natural":  # the mean's step times s²·S; the scale's plain, in raw
                    g_loc = g_m / S + (loc - mu[n]) * prec / S
                    g_scale = g_s / S + (scale * prec - 1 / scale) / S
                    raw = scale + torch.log(-torch.expm1(-scale))
                    m[n][t] = loc - lr * g_loc * scale.square() * S
                    s[n][t] = F.softplus(raw - lr * g_scale * torch.sigmoid(raw))
                else:  # IVON: Price's curvature E[∂L/∂s]/s, the Riemannian correction
                    old, b = scale.pow(-2), prec + g_s / scale
                    new = (1 - lr) * old + lr * b + lr**2 * (old - b).square() / (2 * old)
                    m[n][t] = loc - lr * (g_m + (loc - mu[n]) * prec) / new
                    s[n][t] = new.rsqrt()
    return [torch.stack(m[n]) for n in names] + [torch.stack(s[n]) for n in names]


@pytest.mark.parametrize("update", ["natural", "ivon"])
@pytest.mark.parametrize("particles", [1, 2, 3])
def test_local_steps_equal_their_definition_in_value_and_meta_gradient(float64, update, particles):
    model, x, y = _problem()
    lr = 0.3
    state = inner_loop(
        model,
        LocalNormalGuide(),
        x,
        y,
        InnerConfig(steps=2, particles=particles, update=update),
        lr=lr,
        generator=torch.Generator().manual_seed(5),
    )
    want = _by_definition(model, x, y, 2, lr, particles, update, seed=5)
    assert_same_values_and_meta_gradients(adapted(state, model.names), want, list(model.theta()))


def test_a_shared_body_s_head_draws_as_the_whole_net_would(float64):
    # Only the head adapts: its local draws on the body's features once equal the whole net's
    # local forward with point weights below the head (which draw no noise).
    model, x, _ = _problem()
    guide = LocalNormalGuide()
    state = guide.init(model, 3, adapt=["head.weight", "head.bias"])
    outputs = NetOutputs(model, guide, state, x, moving=["head.weight", "head.bias"])
    assert outputs.features is not None
    var = {n: F.softplus(r).square() for n, r in state["scale_raw"].items()}
    eps = torch.randn(2 * 3, 5, 1, generator=torch.Generator().manual_seed(6))
    got = outputs.local(state["loc"], var, 2, lambda shape: eps)
    want = local_forward(model.net, state["loc"], var, x, lambda shape: eps, particles=2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_learner_takes_it_where_it_can_and_names_what_is_missing():
    model, x, y = _problem()
    learner = MetaLearner(model, "bayes", guide="normal-local")
    assert (learner.inner.particles, learner.eval_particles) == (2, 16)
    with pytest.raises(ValueError, match="draws pre-activations in the analytic ELBO only"):
        MetaLearner(model, "bayes", guide="normal-local", elbo="pyro")
    net = Conv4(1, 3, hidden=4, image_size=16, norm="task")
    conv = HierarchicalBNN(net, Categorical(), prior_scale=0.1)
    with pytest.raises(ValueError, match="a backbone with a local kernel .* got Conv4"):
        MetaLearner(conv, "bayes", guide="normal-local")
    MetaLearner(conv, "anil", guide="normal-local")  # (the head alone: the features' path)
