"""Meta-gradients in closed form, methods as configurations, and invalid options."""

import math

import pytest
import torch
from torch import nn

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.inference import MetaLearner, NonFiniteLossError
from bayesmeta.inference.distributed import chunk_generator
from bayesmeta.inference.outer import _reptile_batches
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP


class Scalar(nn.Module):
    """f(x) = θ·x: the Normal NLL (noise 1) of one point is the quadratic a/2 (θ − c)²."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta]))

    def forward(self, x):
        return x * self.theta


def _quadratic_batch(xs=2.0, ys=1.0, xq=1.5, yq=-0.5):
    t = lambda v: torch.tensor([[[v]]])  # noqa: E731  [T=1, B=1, 1]
    return TaskBatch(t(xs), t(ys), t(xq), t(yq))


@pytest.mark.parametrize("method, order", [("maml", 2), ("fomaml", 1)])
def test_maml_meta_gradient_matches_closed_form(float64, method, order):
    theta, alpha, xs, ys, xq, yq = 0.7, 0.1, 2.0, 1.0, 1.5, -0.5
    a, c, b, d = xs**2, ys / xs, xq**2, yq / xq
    model = HierarchicalBNN(Scalar(theta), Normal(1.0), prior_scale=None)
    learner = MetaLearner(
        model, method=method, inner_steps=1, inner_lr=alpha, optimizer="sgd", meta_lr=1.0
    )
    learner.meta_step(_quadratic_batch(xs, ys, xq, yq))
    theta_prime = theta - alpha * a * (theta - c)
    expected = b * (theta_prime - d) * ((1 - alpha * a) if order == 2 else 1.0)
    # one SGD step with lr 1 moved θ by exactly −grad
    assert model.net.theta.item() == pytest.approx(theta - expected, abs=1e-8)


def test_reptile_step_is_interpolation_toward_adapted_weights(float64):
    theta, alpha, eps, K = 0.7, 0.1, 0.3, 3
    points = [(2.0, 1.0), (1.5, -0.5)]  # (x, y): the support point, then the query point
    model = HierarchicalBNN(Scalar(theta), Normal(1.0), prior_scale=None)
    learner = MetaLearner(model, method="reptile", inner_steps=K, inner_lr=alpha, meta_lr=eps)
    learner.meta_step(_quadratic_batch(*points[0], *points[1]), torch.Generator().manual_seed(3))
    # Each inner step trains on its own slice of support + query: two one-point slices, taken
    # in turn (the third step reuses the first), in the order the same generator deals them.
    # (meta_step keys each chunk's draws by one draw of its generator and the chunk's start.)
    key = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(3)))
    slices = _reptile_batches(torch.zeros(1, 2, 1), K, chunk_generator(key, 0))
    w = theta
    for part in slices:
        x, y = points[part.item()]
        w -= alpha * x * (w * x - y)
    assert model.net.theta.item() == pytest.approx(theta + eps * (w - theta), abs=1e-8)


@pytest.mark.parametrize("ways, per_class, steps", [(5, 6, 3), (20, 3, 3), (4, 5, 2), (3, 2, 4)])
def test_reptile_batches_deal_classes_evenly_and_use_every_point(ways, per_class, steps):
    T, S = 4, ways * per_class
    y = torch.arange(ways).repeat_interleave(per_class).repeat(T, 1)
    slices = _reptile_batches(y, steps, torch.Generator().manual_seed(0))
    assert len(slices) == steps
    used = min(steps, S)
    for t in range(T):
        seen = torch.cat([part[t] for part in slices[:used]])
        assert sorted(seen.tolist()) == list(range(S))  # each point once per pass
        for part in slices[:used]:
            counts = torch.bincount(y[t, part[t]], minlength=ways)
            assert counts.max() - counts.min() <= 1  # every class dealt out evenly
    assert all(torch.equal(slices[k], slices[k % used]) for k in range(steps))
    # Float targets (regression) are shuffled without classes; tasks are shuffled apart.
    slices = _reptile_batches(torch.randn(T, 7, 1), 3, torch.Generator().manual_seed(0))
    assert [part.shape[1] for part in slices] == [3, 2, 2]
    assert sorted(torch.cat(slices, 1)[0].tolist()) == list(range(7))
    assert not all(torch.equal(part[0], part[1]) for part in slices)


def _sinusoid_like(T=4, S=5, Q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, S + Q, 1, generator=g) * 10 - 5
    y = torch.sin(x) * (1 + torch.rand(T, 1, 1, generator=g))
    return TaskBatch(x[:, :S], y[:, :S], x[:, S:], y[:, S:])


def test_bayes_with_flat_prior_delta_guide_one_particle_is_maml(float64):
    batch = _sinusoid_like()
    thetas = []
    for kw in (dict(method="maml"), dict(method="bayes", guide="delta", particles=1)):
        torch.manual_seed(0)
        model = HierarchicalBNN(MLP(1, [8, 8], 1), Normal(1.0), prior_scale=None)
        learner = MetaLearner(model, inner_steps=2, inner_lr=0.05, meta_lr=1e-3, **kw)
        for _ in range(3):
            learner.meta_step(batch)
        thetas.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*thetas, strict=True):
        assert torch.equal(p, q)


def test_metasgd_learns_step_sizes_and_anil_adapts_only_the_head(float64):
    batch = _sinusoid_like()
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=None)
    learner = MetaLearner(model, method="metasgd", inner_steps=1, inner_lr=0.05)
    before = [p.detach().clone() for p in learner.lr_params]
    assert all(torch.all(lr == 0.05) for lr in learner.lr.values())  # starts at inner_lr
    learner.meta_step(batch)
    assert len(before) == len(model.names)
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.lr_params, strict=True))
    # Learned in log space: positive, and one Adam step (1e-3) moves them by about 0.1%.
    for lr in learner.lr.values():
        assert torch.all(lr > 0) and torch.allclose(lr, torch.full_like(lr, 0.05), rtol=2e-3)

    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=None)
    learner = MetaLearner(model, method="anil", inner_steps=2, inner_lr=0.05)
    post = learner.adapt(batch.support_x, batch.support_y)
    mu = model.prior_loc()
    for name, loc in post.state["loc"].items():
        unchanged = torch.equal(loc, mu[name].detach().expand_as(loc))
        assert unchanged == (not name.startswith("head."))


def _classes_like(T=3, N=3, K=2) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N).repeat_interleave(K).expand(T, N * K)
    centres = torch.randn(T, N, 2, generator=g).double() * 3
    at = centres.gather(1, y.unsqueeze(-1).expand(T, N * K, 2))

    def x():
        return at + torch.randn(T, N * K, 2, generator=g).double()

    return TaskBatch(x(), y.clone(), x(), y.clone(), num_classes=N)


def test_every_method_takes_a_finite_step(float64):
    for method, spec in bm.inference.METHODS.items():
        if "regression" in spec.kinds:
            batch, net, lik = _sinusoid_like(), MLP(1, [8], 1), Normal(1.0)
        else:  # (a classifier's method: a regression model is refused, see below)
            batch, net, lik = _classes_like(), MLP(2, [8], 3), bm.models.Categorical()
        model = HierarchicalBNN(net, lik, prior_scale=0.5)
        learner = MetaLearner(model, method=method, inner_steps=2, inner_lr=0.05)
        before = [p.detach().clone() for p in model.parameters()]
        loss = learner.meta_step(batch)
        assert torch.isfinite(torch.tensor(loss))
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("method", ["bayes-proto", "protomaml"])
def test_a_classifier_method_refuses_a_regression_model(method):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
    with pytest.raises(ValueError, match=rf"method '{method}' applies to classification .*Normal"):
        MetaLearner(model, method=method)


def test_non_finite_loss_raises_and_leaves_theta_and_optimizer_untouched(float64):
    batch = _sinusoid_like()
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=None)
    learner = MetaLearner(model, method="maml", inner_steps=3, inner_lr=1e200)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"meta-step 0.*tasks \[0, 1, 2, 3\]") as err:
        learner.meta_step(batch)
    assert "smaller inner_lr (now 1e+200)" in str(err.value)
    assert "particles" not in str(err.value)  # (a point guide has no draws to add)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert learner.optimizer.state_dict()["state"] == {}
    assert learner.step == 0


def test_a_diverging_one_draw_bayes_learner_is_told_to_draw_more():
    batch = _sinusoid_like()
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
    learner = MetaLearner(model, method="bayes", inner_steps=3, inner_lr=1e30, particles=1)
    with pytest.raises(NonFiniteLossError, match=r"more posterior draws .*particles=1"):
        learner.meta_step(batch)


# Methods without random draws: any chunks give the same numbers. (Reptile's mini-batches and
# posterior draws are keyed by where a chunk begins: tests/inference/test_distributed.py.)
@pytest.mark.parametrize("method", ["maml", "anil", "map"])
def test_task_chunks_give_the_whole_batch_meta_gradient(float64, method):
    batch = _sinusoid_like(T=5)
    results = []
    for chunk in (None, 2):  # 2 + 2 + 1 tasks
        torch.manual_seed(0)
        model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
        learner = MetaLearner(model, method=method, inner_steps=2, inner_lr=0.05, task_chunk=chunk)
        loss = learner.meta_step(batch)
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss0, g0), (loss1, g1) = results
    assert g0 and len(g0) == len(g1)
    assert loss0 == pytest.approx(loss1, rel=1e-12)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_non_finite_loss_in_a_later_chunk_names_its_tasks_and_touches_nothing(float64):
    batch = _sinusoid_like(T=5)
    y = batch.query_y.clone()
    y[3] = 1e200  # its squared error overflows to inf
    batch = TaskBatch(batch.support_x, batch.support_y, batch.query_x, y)
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=None)
    learner = MetaLearner(model, method="maml", inner_steps=1, inner_lr=0.05, task_chunk=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"meta-step 0.*tasks \[3\]"):
        learner.meta_step(batch)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # chunk 0-1's gradient discarded
    assert learner.optimizer.state_dict()["state"] == {}


def test_conv4_off_cuda_backpropagates_in_chunks_by_default():
    conv = HierarchicalBNN(bm.nets.Conv4(1, 5, hidden=4), bm.models.Categorical(), prior_scale=0.1)
    assert MetaLearner(conv, "maml").task_chunk == bm.nets.preferred_task_chunk(conv.net, "cpu")
    # one task at a time where the allocator keeps freed memory (glibc), else eight
    assert MetaLearner(conv, "maml").task_chunk == (1 if bm.nets.memory.freed_memory_kept() else 8)
    mlp = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
    assert MetaLearner(mlp, "maml").task_chunk is None
    assert MetaLearner(conv, "maml", task_chunk=None).task_chunk is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope"), "method must be one of"),
        (dict(inner_steps=-1), "inner_steps"),
        (dict(particles=0), "particles"),
        (dict(method="maml", particles=4), "particles must be at most 1"),
        (dict(inner_lr=0.0), "inner_lr"),
        (dict(meta_lr=-1.0), "meta_lr"),
        (dict(elbo="exact"), "elbo must be one of"),
        (dict(guide="laplace"), "guide must be one of"),
        (dict(adapt="body"), "adapt must be"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(task_chunk=0), "task_chunk must be a positive int, 'auto' or None, got 0"),
        (dict(task_chunk="all"), "task_chunk must be a positive int, 'auto' or None, got 'all'"),
    ],
)
def test_invalid_options_raise_before_any_work(kwargs, match):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
    with pytest.raises(ValueError, match=match):
        MetaLearner(model, **kwargs)


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("bayes-head", dict(guide="delta"), "guide='delta' contradicts method 'bayes-head'"),
        ("bayes-head", dict(guide=bm.models.DeltaGuide), "this guide is a point estimate"),
        ("bayes-head", dict(adapt="all"), "adapt='all' contradicts.*use method='bayes'"),
        ("anil", dict(adapt="all"), "adapt='all' contradicts method 'anil'.*method='maml'"),
    ],
)
def test_overrides_that_make_a_method_another_one_are_refused(method, kwargs, match):
    # bayes-head with a Delta guide trained silently to a query MSE of 5.9e7, and with
    # adapt="all" silently became bayes.
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5)
    with pytest.raises(ValueError, match=match):
        MetaLearner(model, method, **kwargs)
    head = [n for n, _ in model.net.named_parameters()][-2:]
    assert MetaLearner(model, method, adapt=head).method.adapt == tuple(head)  # names: allowed


def test_normal_guide_needs_a_prior_and_fit_checks_labels():
    with pytest.raises(ValueError, match="prior_scale"):
        MetaLearner(HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=None), "bayes")
    model = HierarchicalBNN(MLP(1, [8], 3), bm.models.Categorical(), prior_scale=0.5)
    learner = MetaLearner(model, "maml")

    class FloatTargets:
        def sample(self, num_tasks, generator=None):
            return _sinusoid_like(T=num_tasks)

    with pytest.raises(ValueError, match="support_y: the Categorical likelihood expects integer"):
        learner.fit(FloatTargets(), meta_steps=1, meta_batch=2, progress=False)
    assert learner.step == 0
    for kw, match in ((dict(meta_steps=0), "meta_steps"), (dict(meta_batch=0), "meta_batch")):
        with pytest.raises(ValueError, match=match):
            learner.fit(FloatTargets(), **{"meta_steps": 1, "meta_batch": 2, **kw})


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_steps_with_the_scheduled_meta_lr(float64, schedule):
    # fomaml on the quadratic: the meta-gradient at θ is b (θ' − d), θ' = θ − α a (θ − c).
    theta, alpha, eta, steps = 0.7, 0.1, 0.4, 5
    xs, ys, xq, yq = 2.0, 1.0, 1.5, -0.5
    a, c, b, d = xs**2, ys / xs, xq**2, yq / xq

    class Fixed:
        def sample(self, num_tasks, generator=None):
            return _quadratic_batch(xs, ys, xq, yq)

    model = HierarchicalBNN(Scalar(theta), Normal(1.0), prior_scale=None)
    learner = MetaLearner(
        model, method="fomaml", inner_steps=1, inner_lr=alpha, optimizer="sgd", meta_lr=eta
    )
    seen = []
    learner.fit(
        Fixed(),
        meta_steps=steps,
        meta_batch=1,
        progress=False,
        lr_schedule=schedule,
        callback=lambda lrn, rec: seen.append(model.net.theta.item()),
    )
    expected = theta
    for s in range(steps):
        factor = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * s / steps))
        expected -= eta * factor * b * (expected - alpha * a * (expected - c) - d)
        assert seen[s] == pytest.approx(expected, abs=1e-10), s
    assert learner.meta_lr == eta  # the schedule scales the optimizer's step, not the setting


def test_fit_rejects_an_unknown_lr_schedule():
    learner = MetaLearner(HierarchicalBNN(MLP(1, [8], 1), Normal(1.0), prior_scale=0.5), "maml")
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \['constant', 'cosine'\]"):
        learner.fit(_Never(), meta_steps=1, meta_batch=2, progress=False, lr_schedule="step")


class _Never:
    def sample(self, num_tasks, generator=None):
        raise AssertionError("fit sampled tasks before checking its options")


@pytest.mark.parametrize(
    "method, options, optimizer, expected",
    [
        ("bayes", {}, "adam", 1e-2),  # its own default (Method.meta_lr)
        ("bayes", {"update": "natural", "guide": "normal-local"}, "adam", 1e-2),
        ("bayes", {"meta_lr": 3e-4}, "adam", 3e-4),  # a given step size wins
        ("bayes", {"update": "von"}, "adam", 1e-3),  # another rule: the outer rule's
        ("maml", {}, "adam", 1e-3),  # the outer rule's
        ("reptile", {}, "sgd", 0.5),
    ],
)
def test_the_outer_step_size_is_given_else_the_methods_else_its_rules(
    method, options, optimizer, expected
):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(1.0))
    learner = MetaLearner(model, method, **options)
    assert learner.meta_lr == expected
    assert learner.optimizer_name == optimizer
    assert learner.optimizer.param_groups[0]["lr"] == expected
