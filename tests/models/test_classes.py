"""The conjugate class-conditional Gaussian head (``bayes-proto``) and Proto-MAML's head,
against their closed forms written out by hand."""

import math

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import FewShotClassification
from bayesmeta.inference.outer import prototype_head
from bayesmeta.models import Categorical, ClassGaussianGuide, HierarchicalBNN
from bayesmeta.nets import MLP, batched_features

T, N, F_ = 3, 4, 5


def _learner(method="bayes-proto", **kw) -> bm.MetaLearner:
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [F_], N), Categorical(), prior_scale=None)
    learner = bm.MetaLearner(model, method, **kw)
    with torch.no_grad():  # away from the initial values, so that every term matters
        p = model.guide_params
        for name in p:
            p[name].add_(0.3 * torch.randn_like(p[name]))
    return learner


def _support(S=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, 2, generator=g, dtype=torch.get_default_dtype())
    y = torch.randint(0, N, (T, S), generator=g)
    y[:, :2] = 0  # class 0 has at least two shots; some classes may have none
    return x, y


def test_posterior_and_predictive_match_the_closed_form_written_out(float64):
    learner = _learner()
    model = learner.model
    x, y = _support()
    post = learner.adapt(x, y)
    p = model.guide_params
    m, kappa = p[ClassGaussianGuide.LOC], p[ClassGaussianGuide.LOG_KAPPA].exp()
    s2 = (2 * p[ClassGaussianGuide.LOG_SCALE]).exp()
    body = {n: w.unsqueeze(0).expand(T, *w.shape) for n, w in model.prior_loc().items()}
    z = batched_features(model.net, body, x).detach()  # [T, S, F]
    qx = torch.randn(T, 6, 2)
    zq = batched_features(model.net, body, qx).detach()
    pred = post.predict(qx)
    for t in range(T):
        for k in range(N):
            zk = z[t][y[t] == k]  # [n_k, F]
            n = zk.shape[0]
            # Normal-Normal conjugacy in precision form, per feature.
            precision = kappa / s2 + n / s2
            mean = (kappa * m / s2 + zk.sum(0) / s2) / precision
            c = post.state["classes"]
            torch.testing.assert_close(c["mean"][t, k], mean.detach())
            torch.testing.assert_close(c["mean_var"][t, k], (1 / precision).detach())
            # The predictive of a feature vector: Normal(mean, s² + 1/precision) per feature.
            each = torch.distributions.Normal(mean, (s2 + 1 / precision).sqrt())
            logp = each.log_prob(zq[t]).sum(-1).detach()  # [Q]
            torch.testing.assert_close(pred.outputs[0, t, :, k], logp)
    # p(y = k | x) ∝ p(z | k): the softmax of those log densities.
    torch.testing.assert_close(pred.probs, torch.softmax(pred.outputs[0], -1))
    assert pred.outputs.shape == (1, T, 6, N)


def test_the_posterior_mean_is_the_mode_of_prior_times_likelihood(float64):
    """An independent check: the gradient of log prior + log likelihood of the class means
    vanishes at the posterior mean, and its curvature is minus the posterior precision."""
    learner = _learner()
    model = learner.model
    x, y = _support(seed=3)
    post = learner.adapt(x, y)
    p = model.guide_params
    m, kappa = p[ClassGaussianGuide.LOC].detach(), p[ClassGaussianGuide.LOG_KAPPA].exp().detach()
    s = p[ClassGaussianGuide.LOG_SCALE].exp().detach()
    body = {n: w.unsqueeze(0).expand(T, *w.shape) for n, w in model.prior_loc().items()}
    z = batched_features(model.net, body, x).detach()

    def log_joint(mu):  # mu [T, N, F]
        prior = torch.distributions.Normal(m, s / kappa.sqrt()).log_prob(mu).sum()
        chosen = mu.gather(1, y.unsqueeze(-1).expand(T, y.shape[1], F_))
        return prior + torch.distributions.Normal(chosen, s).log_prob(z).sum()

    mode = post.state["classes"]["mean"].clone().requires_grad_()
    (grad,) = torch.autograd.grad(log_joint(mode), mode)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)
    hess = torch.autograd.functional.hessian(lambda v: log_joint(v.view(T, N, F_)), mode.flatten())
    torch.testing.assert_close(
        -hess.diagonal(), 1 / post.state["classes"]["mean_var"].flatten(), rtol=1e-9, atol=1e-9
    )


def test_batched_over_tasks_equals_task_by_task(float64):
    learner = _learner()
    x, y = _support()
    qx = torch.randn(T, 5, 2)
    whole = learner.adapt(x, y).predict(qx).outputs
    for t in range(T):
        alone = learner.adapt(x[t : t + 1], y[t : t + 1]).predict(qx[t : t + 1]).outputs
        torch.testing.assert_close(alone, whole[:, t : t + 1])


def test_a_draw_is_the_plug_in_gaussian_classifier_and_the_kl_is_the_closed_form(float64):
    learner = _learner()
    x, y = _support()
    post = learner.adapt(x, y)
    g = torch.Generator().manual_seed(0)
    noise = learner.guide.noise(post.state, 3, g)
    w = learner.guide.sample(post.state, 3, noise=noise)
    c = post.state["classes"]
    mu = c["mean"] + c["mean_var"].sqrt() * noise["head.weight"]  # [P, T, N, F]
    qx = torch.randn(T, 4, 2)
    net = learner.model.net
    features = batched_features(net, {n: v[0] for n, v in w.items()}, qx)  # [T, Q, F]
    logits = bm.nets.linear_head(w["head.weight"], w["head.bias"], features)  # [P, T, Q, N]
    s2 = c["within_var"].unsqueeze(1).unsqueeze(0)  # [1, T, 1, F]
    log_density = -0.5 * (
        (features.unsqueeze(-2) - mu.unsqueeze(2)).square() / s2.unsqueeze(-2)
    ).sum(-1)
    torch.testing.assert_close(torch.log_softmax(logits, -1), torch.log_softmax(log_density, -1))
    # KL(q ‖ p) of the class means against torch.distributions.
    p = learner.model.guide_params
    m, kappa = p[ClassGaussianGuide.LOC], p[ClassGaussianGuide.LOG_KAPPA].exp()
    prior = torch.distributions.Normal(m, (c["within_var"][0] / kappa).sqrt())
    q = torch.distributions.Normal(c["mean"], c["mean_var"].sqrt())
    expected = torch.distributions.kl_divergence(q, prior).sum((-2, -1))
    torch.testing.assert_close(learner.guide.kl(post.state, learner.model), expected)


def test_meta_training_moves_the_body_and_the_class_prior_and_survives_a_reload(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12 * 6, 1, 16, 16), generator=g, dtype=torch.uint8)
    tasks = FewShotClassification(images, torch.arange(12).repeat_interleave(6), 3, 1, 2)
    torch.manual_seed(0)
    net = bm.nets.Conv4(1, 3, hidden=4, image_size=16)
    learner = bm.MetaLearner(HierarchicalBNN(net, Categorical(), prior_scale=None), "bayes-proto")
    before = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    learner.fit(tasks, meta_steps=3, meta_batch=4, progress=False)
    after = learner.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("guide_params.") for k in moved)
    assert any(k.startswith("net.") and "head" not in k for k in moved)
    batch = tasks.sample(2, torch.Generator().manual_seed(1))
    copy = bm.MetaLearner.load(learner.save(tmp_path / "p.pt"))
    a = learner.adapt(batch.support_x, batch.support_y).predict(batch.query_x).outputs
    b = copy.adapt(batch.support_x, batch.support_y).predict(batch.query_x).outputs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert copy.config()["method"] == "bayes-proto" and copy.eval_particles == 1


def test_the_guide_refuses_a_model_it_cannot_classify_with():
    model = HierarchicalBNN(MLP(1, [4], 1), bm.models.Normal(1.0), prior_scale=None)
    with pytest.raises(ValueError, match="classification likelihood"):
        bm.MetaLearner(model, "maml", guide="class-gaussian", adapt="head")


def test_proto_maml_starts_every_task_at_its_prototype_classifier(float64):
    learner = _learner("protomaml", inner_steps=0)
    model = learner.model
    x, y = _support()
    post = learner.adapt(x, y)
    body = {n: w.unsqueeze(0).expand(T, *w.shape) for n, w in model.prior_loc().items()}
    z = batched_features(model.net, body, x).detach()
    qx = torch.randn(T, 5, 2)
    zq = batched_features(model.net, body, qx).detach()
    logits = post.predict(qx).outputs[0]  # [T, Q, N]
    for t in range(T):
        for k in range(N):
            members = z[t][y[t] == k]
            c = members.mean(0) if len(members) else torch.zeros(F_)
            # 2c·z − ‖c‖² = −‖z − c‖² + ‖z‖²: the negative squared distance, up to ‖z‖².
            expected = -(zq[t] - c).square().sum(-1) + zq[t].square().sum(-1)
            torch.testing.assert_close(logits[t, :, k], expected)
    # In meta-training the prototypes are differentiable into the body.
    state = learner.guide.init(model, T, None)
    head = prototype_head(model, state, x, y)["loc"]["head.weight"]
    (grad,) = torch.autograd.grad(head.sum(), model.net.body[0].weight)
    assert grad.abs().sum() > 0 and math.isfinite(grad.sum().item())


def _prior_learner(method, **kw) -> bm.MetaLearner:
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [F_], N), Categorical(), prior_scale=0.2)
    return bm.MetaLearner(model, method, head_init="prototypes", **kw)


def test_under_a_prior_the_head_prior_is_centred_at_the_prototypes(float64):
    from bayesmeta.inference.outer import initial_state
    from bayesmeta.models.guides import PRIOR_LOC

    learner = _prior_learner("bayes", inner_steps=0)
    model, x, y = learner.model, *_support()
    state = initial_state(model, learner.guide, learner.inner, x, y)
    protos = prototype_head(model, learner.guide.init(model, T, None), x, y)["loc"]
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(state[PRIOR_LOC][name], protos[name])
        torch.testing.assert_close(state["loc"][name], protos[name])
    # The posterior starts at the prior, so the KL is 0 however far the prototypes are from μ.
    assert learner.guide.kl(state, model).abs().max() < 1e-12
    # Moved off it, the KL is the closed form to Normal(prototypes, σ) for the head.
    moved = {f: dict(v) for f, v in state.items()}
    moved["loc"]["head.bias"] = state["loc"]["head.bias"] + 0.1
    sigma = model.prior_scale()["head.bias"]
    expected = (0.5 * (0.1 / sigma).square()).sum()  # the other terms are still 0
    torch.testing.assert_close(learner.guide.kl(moved, model), expected.expand(T))


def test_a_map_step_under_the_prototype_prior_pulls_to_the_prototypes(float64):
    from bayesmeta.inference.inner import InnerConfig, inner_loop, plain_step_size
    from bayesmeta.inference.outer import initial_state
    from bayesmeta.models.guides import PRIOR_LOC

    learner = _prior_learner("map", inner_steps=1)
    model, x, y = learner.model, *_support()
    start = initial_state(model, learner.guide, learner.inner, x, y)
    start["loc"]["head.bias"] = start["loc"]["head.bias"] + 0.5  # off the prior's mean
    after = inner_loop(model, learner.guide, x, y, InnerConfig(steps=1), lr=0.1, state=start)
    # By hand: w − lr_w · (∇ mean NLL + (w − prototype)/(σ² S)), the plain step's size.
    w = {n: t.detach().clone().requires_grad_() for n, t in start["loc"].items()}
    nll = -model.likelihood.log_prob(bm.nets.batched_forward(model.net, w, x), y).sum()
    grads = torch.autograd.grad(nll, list(w.values()))
    step = plain_step_size(model, 0.1, False, list(model.names), x.shape[1])
    sigma = model.prior_scale()
    for (name, value), g in zip(w.items(), grads, strict=True):
        mean = start[PRIOR_LOC].get(name, model.prior_loc()[name])
        pull = (value - mean) / sigma[name].square()
        expected = value - step[name] * (g + pull) / x.shape[1]
        torch.testing.assert_close(after["loc"][name], expected.detach())


def test_the_pyro_backend_refuses_a_prior_it_does_not_know():
    learner = _prior_learner("bayes", inner_steps=1, elbo="pyro", update="gradient")
    with pytest.raises(ValueError, match="per-task prior means.*backend='analytic'"):
        learner.adapt(*_support())


def test_head_init_auto_resolves_by_model_and_a_choice_survives_a_reload(tmp_path):
    torch.manual_seed(0)
    classifier = HierarchicalBNN(MLP(2, [F_], N), Categorical(), prior_scale=0.2)
    assert bm.MetaLearner(classifier, "bayes").method.head_init == "prototypes"
    assert bm.MetaLearner(classifier, "map").method.head_init == "prototypes"
    assert bm.MetaLearner(classifier, "maml").method.head_init == "theta"
    regression = HierarchicalBNN(MLP(1, [F_], 1), bm.models.Normal(0.3), prior_scale=0.2)
    assert bm.MetaLearner(regression, "bayes").method.head_init == "theta"
    chosen = bm.MetaLearner(classifier, "bayes", head_init="theta")
    loaded = bm.MetaLearner.load(chosen.save(tmp_path / "theta.pt"))
    assert loaded.method.head_init == "theta" and loaded.inner.head_init == "theta"
    with pytest.raises(ValueError, match="head_init must be 'theta', 'prototypes' or 'auto'"):
        bm.MetaLearner(classifier, "bayes", head_init="zero")
