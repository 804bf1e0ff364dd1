"""A user's own inner objective and outer loop: a custom loss equal to the likelihood's adapts
identically, and a differentiable adaptation gives the same meta-gradient as meta_step."""

import math

import pytest
import torch

import bayesmeta as bm


def _learner(method="maml", **kw):
    torch.manual_seed(0)
    prior = None if method == "maml" else 0.3
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [8], 1), bm.models.Normal(0.5), prior)
    return bm.MetaLearner(model, method, inner_lr=0.01, inner_steps=2, **kw)


def _batch():
    b = bm.data.Sinusoid(5, 5).sample(3, torch.Generator().manual_seed(0))
    return bm.data.TaskBatch(b.support_x.double(), b.support_y.double(), b.query_x.double(),
                             b.query_y.double())  # fmt: skip


def _normal_nll(outputs, y):  # [P, T, S, 1], [T, S, 1] -> [P, T]
    return -torch.distributions.Normal(outputs, 0.5).log_prob(y).sum((-1, -2))


@pytest.mark.parametrize("method", ["maml", "bayes", "metasgd"])
def test_an_inner_loss_equal_to_the_likelihood_adapts_identically(float64, method):
    batch = _batch()
    posts = []
    for loss in (None, _normal_nll):
        learner = _learner(method, inner_loss=loss)
        posts.append(learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator()))
    for field in posts[0].state:
        for name in posts[0].state[field]:
            a, b = posts[0].state[field][name], posts[1].state[field][name]
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    bad = _learner(inner_loss=lambda f, y: f.sum())
    with pytest.raises(ValueError, match=r"must return a Tensor \[P, T\] or \[T\]"):
        bad.adapt(batch.support_x, batch.support_y)


@pytest.mark.parametrize("method", ["maml", "bayes"])
def test_an_inner_loss_that_is_not_finite_names_the_tasks(float64, method):
    def log_of_zero_for_task_1(outputs, y):
        loss = _normal_nll(outputs, y)
        return loss + torch.tensor([0.0, math.nan, 0.0], dtype=loss.dtype)

    batch = _batch()
    learner = _learner(method, inner_loss=log_of_zero_for_task_1)
    message = r"inner_loss '.*log_of_zero_for_task_1' was not finite .* for tasks \[1\] of 3"
    with pytest.raises(ValueError, match=message):
        learner.adapt(batch.support_x, batch.support_y)
    post = learner.adapt(batch.support_x, batch.support_y, steps=0)  # the loss never ran
    assert bool(torch.isfinite(post.predict(batch.query_x).mean).all())


def test_differentiable_adaptation_gives_meta_steps_gradient(float64):
    batch = _batch()
    own = _learner(inner_loss=_normal_nll)
    post = own.adapt_differentiable(batch.support_x, batch.support_y)
    f = post.outputs(batch.query_x)  # [1, T, Q, 1], differentiable in θ
    loss = -torch.distributions.Normal(f, 0.5).log_prob(batch.query_y).sum(-1).mean()
    own.optimizer.zero_grad()
    loss.backward()
    ref = _learner()
    ref.optimizer.zero_grad()
    ref.meta_step(batch)  # its optimizer stepped after computing the same gradient
    for p, q in zip(own.model.theta(), ref.model.theta(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)


def test_a_saved_inner_loss_must_be_passed_again(tmp_path):
    learner = _learner(inner_loss=_normal_nll)
    path = learner.save(tmp_path / "l.pt")
    with pytest.raises(ValueError, match="trained with the inner loss '_normal_nll'"):
        bm.MetaLearner.load(path)
    assert bm.MetaLearner.load(path, inner_loss=_normal_nll).inner.loss is _normal_nll
    with pytest.raises(TypeError, match="inner_loss must be callable"):
        _learner(inner_loss="mse")
