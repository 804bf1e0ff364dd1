"""The exact head posterior against Bayesian linear regression written out, and SVI on the same
head converging to it."""

import math

import pytest
import torch
import torch.nn.functional as F

import bayesmeta as bm
from bayesmeta.inference import InnerConfig, inner_loop
from bayesmeta.models import GaussianHeadGuide, HierarchicalBNN, Normal, NormalGuide
from bayesmeta.nets import MLP, batched_features

HEAD = ["head.weight", "head.bias"]
T, S, OUT, NOISE = 3, 6, 2, 0.4


def _model():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [4], OUT), Normal(NOISE), prior_scale=0.7)
    with torch.no_grad():  # distinct prior scales per weight, so nothing is symmetric
        for raw in model.scale_raw:
            raw.add_(0.3 * torch.randn_like(raw))
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, S, 2, generator=g), torch.randn(T, S, OUT, generator=g)


def _exact(model, x, y):
    """Per task and output: mean [F+1] and covariance [F+1, F+1], by plain matrix algebra."""
    loc, scale = model.prior_loc(), model.prior_scale()
    body = {k: v.expand(T, *v.shape) for k, v in loc.items() if k.startswith("body")}
    phi = batched_features(model.net, body, x)
    phi = torch.cat([phi, torch.ones_like(phi[..., :1])], -1)  # [T, S, F+1]
    m0 = torch.cat([loc["head.weight"], loc["head.bias"][:, None]], -1)
    v0 = torch.cat([scale["head.weight"], scale["head.bias"][:, None]], -1).square()
    means, covs = (
        torch.empty(T, OUT, phi.shape[-1]),
        torch.empty(T, OUT, phi.shape[-1], phi.shape[-1]),
    )
    for t in range(T):
        for o in range(OUT):
            cov = torch.linalg.inv(torch.diag(1 / v0[o]) + phi[t].T @ phi[t] / NOISE**2)
            covs[t, o] = cov
            means[t, o] = cov @ (m0[o] / v0[o] + phi[t].T @ y[t, :, o] / NOISE**2)
    return phi, means, covs, m0, v0


def test_conditioning_is_bayesian_linear_regression(float64):
    model = _model()
    x, y = _data()
    guide = GaussianHeadGuide()
    state = inner_loop(model, guide, x, y, InnerConfig(steps=0, adapt=HEAD), lr=0.1)
    phi, means, covs, m0, v0 = _exact(model, x, y)
    got = torch.cat([state["loc"]["head.weight"], state["loc"]["head.bias"][..., None]], -1)
    torch.testing.assert_close(got, means, rtol=0, atol=1e-10)
    tril = state["precision_tril"]["head"]
    torch.testing.assert_close(torch.cholesky_inverse(tril), covs, rtol=0, atol=1e-10)
    # The body is shared: pinned at θ's mean.
    for name in model.names[:-2]:
        torch.testing.assert_close(state["loc"][name][0], model.prior_loc()[name])
    # The predictive of the outputs at new inputs, and the KL to the prior, in closed form.
    xq = torch.randn(T, 5, 2)
    body = {k: v.expand(T, *v.shape) for k, v in model.prior_loc().items() if k.startswith("body")}
    fq = batched_features(model.net, body, xq)
    mean, var = guide.marginal(state, fq)
    pq = torch.cat([fq, torch.ones_like(fq[..., :1])], -1)
    torch.testing.assert_close(mean, torch.einsum("tqk,tok->tqo", pq, means), rtol=0, atol=1e-10)
    want = torch.einsum("tqk,tokl,tql->tqo", pq, covs, pq)
    torch.testing.assert_close(var, want, rtol=0, atol=1e-10)
    q = torch.distributions.MultivariateNormal(means, covs)
    p = torch.distributions.MultivariateNormal(m0, torch.diag_embed(v0))
    kl = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(guide.kl(state, model), kl, rtol=0, atol=1e-9)


def test_draws_have_the_posterior_moments_and_the_inner_loop_ignores_steps(float64):
    model = _model()
    x, y = _data()
    guide = GaussianHeadGuide()
    state = inner_loop(model, guide, x, y, InnerConfig(steps=5, adapt=HEAD), lr=3.0)
    again = inner_loop(model, guide, x, y, InnerConfig(steps=0, adapt=HEAD), lr=0.1)
    torch.testing.assert_close(state["loc"]["head.bias"], again["loc"]["head.bias"])
    _, means, covs, _, _ = _exact(model, x, y)
    w = guide.sample(state, 200_000, torch.Generator().manual_seed(0))
    assert w["head.weight"].shape == (200_000, T, OUT, 4) and w["body.0.weight"].shape[0] == 200_000
    z = torch.cat([w["head.weight"], w["head.bias"][..., None]], -1)
    torch.testing.assert_close(z.mean(0), means, rtol=0, atol=0.01)
    centred = z - z.mean(0)
    cov = torch.einsum("ptoi,ptoj->toij", centred, centred) / z.shape[0]
    torch.testing.assert_close(cov, covs, rtol=0, atol=0.01)


def test_svi_on_the_head_converges_to_the_exact_posterior(float64):
    # For a Gaussian posterior the mean-field optimum has the exact means and variances
    # 1 / diag(precision); natural-gradient SVI on the head must land there.
    model = _model()
    x, y = _data()
    _, means, covs, _, _ = _exact(model, x, y)
    g = torch.Generator().manual_seed(0)
    state = inner_loop(
        model,
        NormalGuide(),
        x,
        y,
        InnerConfig(steps=300, particles=256, adapt=HEAD, update="natural"),
        lr=0.2,
        generator=g,
    )
    loc = torch.cat([state["loc"]["head.weight"], state["loc"]["head.bias"][..., None]], -1)
    raw = torch.cat(
        [state["scale_raw"]["head.weight"], state["scale_raw"]["head.bias"][..., None]], -1
    )
    torch.testing.assert_close(loc, means, rtol=0, atol=0.03)
    precision_diag = torch.linalg.inv(covs).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(F.softplus(raw), precision_diag.rsqrt(), rtol=0.05, atol=0)


def test_the_gaussian_head_is_chosen_where_it_applies_and_refused_elsewhere():
    mlp = HierarchicalBNN(MLP(1, [8], 1), Normal(0.3), prior_scale=0.5)
    assert bm.MetaLearner(mlp, "bayes-head").method.guide == "gaussian-head"
    conv = HierarchicalBNN(bm.nets.Conv4(1, 3, hidden=2, image_size=16), bm.models.Categorical())
    assert bm.MetaLearner(conv, "bayes-head").method.guide == "prototype-laplace"
    seq = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    other = HierarchicalBNN(seq, Normal(0.3), prior_scale=0.5)
    assert bm.MetaLearner(other, "bayes-head").method.guide == "normal"
    with pytest.raises(ValueError, match="needs a network with a linear head"):
        bm.MetaLearner(other, "bayes-head", guide="gaussian-head")
    with pytest.raises(ValueError, match="needs adapt = the head"):
        bm.MetaLearner(mlp, "bayes", guide="gaussian-head")


def test_newton_steps_find_the_map_of_a_softmax_head_and_its_gauss_newton_precision(float64):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [4], 3), bm.models.Categorical(), prior_scale=0.8)
    x = torch.randn(T, 7, 2)
    y = torch.randint(0, 3, (T, 7))
    guide = GaussianHeadGuide()
    # The block-diagonal (per class) curvature converges linearly: enough steps to be exact.
    state = inner_loop(model, guide, x, y, InnerConfig(steps=80, adapt=HEAD), lr=1.0)
    loc, scale = model.prior_loc(), model.prior_scale()
    body = {k: v.expand(T, *v.shape) for k, v in loc.items() if k.startswith("body")}
    phi = batched_features(model.net, body, x)
    phi = torch.cat([phi, torch.ones_like(phi[..., :1])], -1)
    m0 = torch.cat([loc["head.weight"], loc["head.bias"][:, None]], -1)
    v0 = torch.cat([scale["head.weight"], scale["head.bias"][:, None]], -1).square()
    m = torch.cat([state["loc"]["head.weight"], state["loc"]["head.bias"][..., None]], -1)
    m = m.detach().requires_grad_()
    # The negative log posterior's gradient vanishes at the fit: it is the MAP.
    logits = torch.einsum("tsk,tok->tso", phi, m)
    neg_log_post = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
    neg_log_post = neg_log_post + ((m - m0).square() / (2 * v0)).sum()
    (grad,) = torch.autograd.grad(neg_log_post, [m])
    assert grad.abs().max() < 1e-9
    p = torch.softmax(logits.detach(), -1)
    want = torch.diag_embed(1 / v0) + torch.einsum("tsk,tso,tsl->tokl", phi, p * (1 - p), phi)
    tril = state["precision_tril"]["head"]
    torch.testing.assert_close(tril @ tril.mT, want, rtol=0, atol=1e-10)
    # One damped step from the prior, written out.
    half = inner_loop(model, guide, x, y, InnerConfig(steps=1, adapt=HEAD), lr=0.5)
    logits = torch.einsum("tsk,ok->tso", phi, m0)
    p = torch.softmax(logits, -1)
    g = torch.einsum("tsk,tso->tok", phi, p - torch.nn.functional.one_hot(y, 3))
    precision = torch.diag_embed(1 / v0) + torch.einsum("tsk,tso,tsl->tokl", phi, p * (1 - p), phi)
    step = m0 - 0.5 * torch.linalg.solve(precision, g.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(half["loc"]["head.bias"], step[..., -1], rtol=0, atol=1e-10)


def test_the_prototype_laplace_head_is_the_map_under_a_prototype_prior_mean(float64):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [4], 3), bm.models.Categorical(), prior_scale=0.8)
    learner = bm.MetaLearner(model, "bayes-head", inner_steps=80, particles=1)
    assert isinstance(learner.guide, bm.models.PrototypeLaplaceGuide)
    assert learner.eval_particles == 1  # its predictive needs no draws
    with torch.no_grad():
        model.guide_params["laplace_prototype_scale"].fill_(0.7)
        model.guide_params["laplace_log_temperature"].fill_(0.4)
    x = torch.randn(T, 7, 2)
    y = torch.randint(0, 3, (T, 7))
    post = learner.adapt(x, y)
    loc, scale = model.prior_loc(), model.prior_scale()
    body = {k: v.expand(T, *v.shape) for k, v in loc.items() if k.startswith("body")}
    z = batched_features(model.net, body, x).detach()
    phi = torch.cat([z, torch.ones_like(z[..., :1])], -1)
    v0 = torch.cat([scale["head.weight"], scale["head.bias"][:, None]], -1).square().detach()
    m0 = torch.cat([loc["head.weight"], loc["head.bias"][:, None]], -1).detach()
    # The prior mean of every task: θ's plus 0.7 times the prototype classifier, by hand.
    m0 = m0.expand(T, *m0.shape).clone()
    for t in range(T):
        for k in range(3):
            members = z[t][y[t] == k]
            c = members.mean(0) if len(members) else torch.zeros(z.shape[-1])
            m0[t, k, :-1] += 0.7 * 2 * c
            m0[t, k, -1] -= 0.7 * c.square().sum()
    m = torch.cat([post.state["loc"]["head.weight"], post.state["loc"]["head.bias"][..., None]], -1)
    m = m.detach().requires_grad_()
    logits = torch.einsum("tsk,tok->tso", phi, m)
    neg_log_post = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
    neg_log_post = neg_log_post + ((m - m0).square() / (2 * v0)).sum()
    (grad,) = torch.autograd.grad(neg_log_post, [m])
    assert grad.abs().max() < 1e-9
    p = torch.softmax(logits.detach(), -1)
    want = torch.diag_embed(1 / v0) + torch.einsum("tsk,tso,tsl->tokl", phi, p * (1 - p), phi)
    tril = post.state["precision_tril"]["head"]
    torch.testing.assert_close(tril @ tril.mT, want, rtol=0, atol=1e-10)
    # The KL is to that prior, against torch.distributions.
    cov = torch.cholesky_inverse(tril)
    q = torch.distributions.MultivariateNormal(m.detach(), cov)
    prior = torch.distributions.MultivariateNormal(m0, torch.diag_embed(v0).expand_as(cov))
    kl = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(learner.guide.kl(post.state, model), kl)
    # The predictive: probit over each logit's Gaussian marginal, with temperature e^0.4.
    qx = torch.randn(T, 5, 2)
    zq = batched_features(model.net, body, qx).detach()
    phq = torch.cat([zq, torch.ones_like(zq[..., :1])], -1)  # [T, Q, k]
    mean = torch.einsum("tqk,tok->tqo", phq, m.detach())
    var = torch.einsum("tqk,tokl,tql->tqo", phq, cov, phq)
    tau = math.exp(0.4)
    expected = tau * mean / (1 + math.pi / 8 * tau**2 * var).sqrt()
    pred = post.predict(qx)
    torch.testing.assert_close(pred.outputs[0], expected)
    torch.testing.assert_close(pred.probs, torch.softmax(expected, -1))
