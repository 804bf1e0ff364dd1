"""SVGD particles (Bayesian MAML) against exact answers: the kernel by hand, Pyro's own Stein
kernel terms, a MAP step with one particle, and per-task runs."""

import itertools
import math

import pytest
import torch
from pyro.infer import RBFSteinKernel

import bayesmeta as bm
from bayesmeta.inference import InnerConfig, inner_loop
from bayesmeta.models import DeltaGuide, HierarchicalBNN, Normal, ParticleGuide, rbf_kernel
from bayesmeta.nets import MLP

NOISE, PRIOR = 0.5, 0.7


def _model():
    torch.manual_seed(0)
    return HierarchicalBNN(MLP(2, [3], 1), Normal(NOISE), prior_scale=PRIOR)


def _data(T=3, S=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, S, 2, generator=g), torch.randn(T, S, 1, generator=g)


def test_rbf_kernel_in_float32_far_from_zero_matches_float64():
    """Particles of a small spread far from 0 (a weight vector of a network, drawn at a tenth
    of its size): float32 keeps k(w, w) = 1 and the other entries within 1e-3 of float64."""
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(1, 3, 20_000, generator=g)
    w = loc + 0.01 * torch.randn(5, 3, 20_000, generator=g)
    kernel, repulsion = rbf_kernel(w)
    exact, exact_repulsion = rbf_kernel(w.double())
    assert torch.isfinite(kernel).all() and torch.isfinite(repulsion).all()
    torch.testing.assert_close(kernel.diagonal(0, 0, 1), torch.ones(3, 5))
    torch.testing.assert_close(kernel.double(), exact, atol=1e-3, rtol=0)
    torch.testing.assert_close(repulsion.double(), exact_repulsion, atol=1e-2, rtol=1e-3)


def test_rbf_kernel_and_its_repulsion_by_hand(float64):
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [1.0, 3.0]])  # M = 4, D = 2
    kernel, repulsion = rbf_kernel(a.unsqueeze(1))  # a task axis of one
    pairs = list(itertools.combinations(range(4), 2))
    h = torch.stack([(a[i] - a[j]).square() for i, j in pairs]).median(0).values / math.log(5)
    for m in range(4):
        push = torch.zeros(2)
        for j in range(4):
            x = a[j].clone().requires_grad_()
            k = torch.exp(-((x - a[m]).square() / h).sum())
            (dk,) = torch.autograd.grad(k, [x])
            assert kernel[j, m, 0].item() == pytest.approx(k.item(), abs=1e-12)
            push += dk
        torch.testing.assert_close(repulsion[m, 0], push, rtol=0, atol=1e-12)
    # A fixed bandwidth, and one particle: k = 1 with no repulsion.
    kernel, _ = rbf_kernel(a.unsqueeze(1), bandwidth=2.0)
    assert kernel[0, 1, 0].item() == pytest.approx(math.exp(-(4 + 4) / 2.0))
    kernel, repulsion = rbf_kernel(a[:1].unsqueeze(1))
    assert kernel.item() == 1.0 and not repulsion.any()


def test_svgd_step_agrees_with_pyro_stein_kernel_terms(float64):
    # Pyro's SVGD step: (K ∇log p + Σ ∇k) / M with RBFSteinKernel's median heuristic, here on
    # a toy linear model's log joint; the inner loop's step per support point is it over S.
    model = HierarchicalBNN(MLP(2, [], 1), Normal(NOISE), prior_scale=PRIOR)
    x, y = _data(T=1)
    guide = ParticleGuide(4)
    state = guide.init(model, 1, generator=torch.Generator().manual_seed(3))
    lr, S = 0.3, x.shape[1]
    after = inner_loop(model, guide, x, y, InnerConfig(steps=1), lr=lr, state=state)
    w = torch.cat(
        [state["particles"]["head.weight"][:, 0, 0], state["particles"]["head.bias"][:, 0]], -1
    )
    w = w.detach().requires_grad_()  # [M, 3]: weight (2) then bias, as the loop joins them
    mu = torch.cat([model.prior_loc()["head.weight"][0], model.prior_loc()["head.bias"]])
    f = x[0] @ w[:, :2].T + w[:, 2]  # [S, M]
    log_joint = torch.distributions.Normal(f, NOISE).log_prob(y[0]).sum(0)
    log_joint = log_joint + torch.distributions.Normal(mu, PRIOR).log_prob(w).sum(-1)
    (grad,) = torch.autograd.grad(log_joint.sum(), [w])
    log_kernel, kernel_grad = RBFSteinKernel().log_kernel_and_grad(w.detach())
    kernel = log_kernel.sum(-1).exp()
    pyro_grad = (kernel @ -grad + torch.einsum("nm,nm...->n...", kernel, kernel_grad)) / 4
    # A plain step's size is preconditioned by the likelihood's and the prior's curvature.
    step = lr / (1 / NOISE**2 + 1 / (PRIOR**2 * S))
    expected = w.detach() - step / S * pyro_grad
    got = torch.cat(
        [after["particles"]["head.weight"][:, 0, 0], after["particles"]["head.bias"][:, 0]], -1
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_one_particle_takes_a_map_gradient_step(float64):
    model = _model()
    x, y = _data()
    state = ParticleGuide(1).init(model, 3, generator=torch.Generator().manual_seed(0))
    svgd = inner_loop(model, ParticleGuide(1), x, y, InnerConfig(steps=3), lr=0.2, state=state)
    start = {"loc": {n: v[0] for n, v in state["particles"].items()}}
    map_ = inner_loop(model, DeltaGuide(), x, y, InnerConfig(steps=3), lr=0.2, state=start)
    for name in model.names:
        torch.testing.assert_close(
            svgd["particles"][name][0], map_["loc"][name], rtol=0, atol=1e-10
        )


def test_batched_particles_equal_per_task_runs_and_repel(float64):
    model = _model()
    x, y = _data(T=3)
    guide = ParticleGuide(4)
    state = guide.init(model, 3, generator=torch.Generator().manual_seed(2))
    batched = inner_loop(model, guide, x, y, InnerConfig(steps=4), lr=0.2, state=state)
    for t in range(3):
        one = {"particles": {n: v[:, t : t + 1] for n, v in state["particles"].items()}, "loc": {}}
        single = inner_loop(
            model, guide, x[t : t + 1], y[t : t + 1], InnerConfig(steps=4), lr=0.2, state=one
        )
        for name in model.names:
            torch.testing.assert_close(
                batched["particles"][name][:, t : t + 1],
                single["particles"][name],
                atol=1e-10,
                rtol=0,
            )
    # From one point, the repulsive term alone pushes identical particles nowhere; from a
    # spread they stay apart instead of collapsing onto the MAP.
    spread = torch.cat([v.flatten(2) for v in batched["particles"].values()], -1)
    assert (spread[0] - spread[1]).norm(dim=-1).min() > 1e-3


def test_bmaml_meta_trains_and_predicts_with_its_particles(tmp_path):
    model = HierarchicalBNN(MLP(1, [16], 1), Normal(0.3), prior_scale=0.1)
    learner = bm.MetaLearner(model, "bmaml", particles=3, inner_steps=2, inner_lr=0.01)
    assert learner.guide.num_particles == 3 and learner.eval_particles == 3
    tasks = bm.data.Sinusoid(5, 5)
    learner.fit(tasks, meta_steps=3, meta_batch=4, progress=False)
    batch = tasks.sample(2, torch.Generator().manual_seed(0))
    post = learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    pred = post.predict(batch.query_x, particles=50)  # the particles, however many are asked
    assert pred.outputs.shape == (3, 2, 5, 1)
    assert (pred.mutual_information > 0).all()
    copy = bm.MetaLearner.load(learner.save(tmp_path / "b.pt"))
    assert copy.method.name == "bmaml" and copy.guide.num_particles == 3
    with pytest.raises(ValueError, match="guide that starts at the prior"):
        bm.MetaLearner(HierarchicalBNN(MLP(1, [4], 1), Normal(0.3), prior_scale=None), "bmaml")


def test_particles_are_the_draws_of_the_inference_data():
    import bayesmeta.diagnostics as dg

    model = HierarchicalBNN(MLP(1, [4], 1), Normal(0.3), prior_scale=0.1)
    learner = bm.MetaLearner(model, "bmaml", particles=3, inner_steps=1, inner_lr=0.01)
    batch = bm.data.Sinusoid(5, 5).sample(2, torch.Generator().manual_seed(0))
    post = learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    idata = dg.to_inference_data(post, (batch.query_x, batch.query_y), num_draws=10)
    assert dict(idata.posterior.sizes)["chain"] == 1 and dict(idata.posterior.sizes)["draw"] == 3
    torch.testing.assert_close(
        torch.as_tensor(idata.posterior["head.bias"].values[0]),
        post.state["particles"]["head.bias"],
    )
