"""The shipped likelihoods beyond Normal and Categorical, end to end, and the predictive
mixture's scores against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import Sinusoid, TaskBatch
from bayesmeta.diagnostics import to_inference_data
from bayesmeta.inference import Prediction
from bayesmeta.models import Bernoulli, HeteroscedasticNormal, HierarchicalBNN, StudentT
from bayesmeta.nets import MLP


class MultiLabelTasks:
    """Each task: 3 labels, label l of x is 1 when x · w_tl > 0 (w_tl drawn per task)."""

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        w = torch.randn(num_tasks, 2, 3, generator=generator)
        x = torch.randn(num_tasks, 20, 2, generator=generator)
        y = (x @ w > 0).float()
        return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


def _learner(likelihood, out_features, method):
    torch.manual_seed(0)
    net = MLP(2 if isinstance(likelihood, Bernoulli) else 1, [16], out_features)
    model = HierarchicalBNN(net, likelihood, prior_scale=0.5)
    return bm.MetaLearner(model, method, inner_steps=2, inner_lr=0.05)


CASES = [
    ("studentt", lambda: StudentT(df=4.0, scale=0.3, learn_scale=True), 1, Sinusoid(5, 10)),
    ("heteroscedastic", lambda: HeteroscedasticNormal(min_scale=0.1), 2, Sinusoid(5, 10)),
    ("bernoulli", lambda: Bernoulli(), 3, MultiLabelTasks()),
]


@pytest.mark.parametrize("method", ["bayes", "maml"])
@pytest.mark.parametrize("name, make, out, tasks", CASES, ids=[c[0] for c in CASES])
def test_trains_predicts_evaluates_exports_saves_and_loads(
    name, make, out, tasks, method, tmp_path
):
    learner = _learner(make(), out, method)
    learner.fit(tasks, meta_steps=3, meta_batch=4, seed=0, progress=False)
    scores = bm.evaluate(learner, tasks, num_tasks=8, meta_batch=4)
    assert all(math.isfinite(v) for v in scores.values()), scores
    if name == "bernoulli":
        assert {"accuracy", "ece", "brier"} <= scores.keys() and 0 <= scores["accuracy"] <= 1
    else:
        assert {"mse", "coverage_90", "crps"} <= scores.keys() and 0 <= scores["coverage_90"] <= 1
    batch = tasks.sample(2, torch.Generator().manual_seed(3))
    post = learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    pred = post.predict(batch.query_x, generator=torch.Generator().manual_seed(1))
    assert pred.log_prob(batch.query_y).shape == (2, 10)
    assert pred.mean.shape == batch.query_y.shape and (pred.mutual_information >= -1e-6).all()
    idata = to_inference_data(post, (batch.query_x, batch.query_y), num_draws=8, chains=2)
    assert idata.posterior_predictive["obs"].shape[-1] == batch.query_y.shape[-1]
    assert idata.log_likelihood["obs"].shape[-2:] == (2, 10)
    copy = bm.MetaLearner.load(learner.save(tmp_path / "l.pt"))
    assert type(copy.model.likelihood) is type(learner.model.likelihood)
    again = copy.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    torch.testing.assert_close(
        again.predict(batch.query_x, generator=torch.Generator().manual_seed(1)).mean, pred.mean
    )


def test_student_t_predictive_is_the_mixture_of_its_particles(float64):
    lik = StudentT(df=5.0, scale=0.4)
    f = torch.randn(3, 2, 4, 1)  # [P, T, Q, D]
    pred = Prediction(f, "regression", likelihood=lik)
    y = torch.randn(2, 4, 1)
    comps = torch.distributions.StudentT(5.0, f, 0.4).log_prob(y).sum(-1)  # [P, T, Q]
    torch.testing.assert_close(pred.log_prob(y), comps.logsumexp(0) - math.log(3))
    var = 0.4**2 * 5 / 3  # a Student-t's variance, df / (df - 2) scale²
    torch.testing.assert_close(pred.mean, f.mean(0))
    torch.testing.assert_close(pred.stddev, (var + f.var(0, unbiased=False)).sqrt())
    torch.testing.assert_close(
        pred.mutual_information, 0.5 * (pred.stddev.square() / var).log().sum(-1)
    )


def test_draw_based_quantiles_and_crps_match_the_gaussian_closed_forms(float64):
    loc, raw = torch.randn(1, 2, 3, 1), torch.randn(1, 2, 3, 1)
    scale = torch.nn.functional.softplus(raw) + 1e-3
    hetero = Prediction(torch.cat([loc, raw], -1), "regression", likelihood=HeteroscedasticNormal())
    exact = Prediction(loc, "regression", noise=torch.tensor(1.0), output_var=scale[0].square() - 1)
    g = torch.Generator().manual_seed(0)
    for q in (0.05, 0.5, 0.95):
        error = (hetero.quantile(q, g) - exact.quantile(q)) / scale[0]
        assert error.abs().max() < 0.25  # 1024 draws: up to 0.07 sd of sampling error
    y = torch.randn(2, 3, 1)
    torch.testing.assert_close(hetero.crps(y, g), exact.crps(y), rtol=0.08, atol=0.01)


def test_bernoulli_scores_per_label(float64):
    f = torch.tensor([[[[3.0, -3.0]]], [[[-3.0, -3.0]]]])  # [P=2, T=1, Q=1, L=2]
    pred = Prediction(f, "multilabel", likelihood=Bernoulli())
    p = torch.sigmoid(f)
    torch.testing.assert_close(pred.probs, p.mean(0))
    h = lambda q: -(q * q.log() + (1 - q) * (1 - q).log())  # noqa: E731
    torch.testing.assert_close(pred.entropy, h(p.mean(0)).sum(-1))
    torch.testing.assert_close(pred.mutual_information, h(p.mean(0)).sum(-1) - h(p).sum(-1).mean(0))
    assert pred.mutual_information.item() > 0.3  # the particles disagree on the first label
    y = torch.tensor([[[1.0, 0.0]]])
    lp = (y * p.log() + (1 - y) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(pred.log_prob(y), lp.logsumexp(0) - math.log(2))


def test_bad_targets_and_outputs_are_refused():
    with pytest.raises(ValueError, match="2 network outputs per target"):
        HeteroscedasticNormal().check_targets(torch.zeros(1, 2, 1), 3)
    with pytest.raises(ValueError, match="0/1 labels"):
        Bernoulli().check_targets(torch.full((1, 2, 3), 0.5), 3)
    with pytest.raises(ValueError, match="df must be a positive finite float"):
        StudentT(df=0)
    pred = Prediction(torch.zeros(1, 1, 2, 2), "regression", likelihood=HeteroscedasticNormal())
    with pytest.raises(ValueError, match=r"targets must have shape \[T, B, 1\]"):
        pred.log_prob(torch.zeros(1, 2, 2))


def test_an_own_likelihood_loads_only_with_its_model(tmp_path):
    class Laplace(bm.models.Likelihood):
        kind = "regression"

        def distribution(self, f):
            return torch.distributions.Independent(torch.distributions.Laplace(f, 0.3), 1)

        def log_prob(self, f, y):
            return torch.distributions.Laplace(f, 0.3).log_prob(y).sum(-1)

        def check_targets(self, y, out_features, name="y"):
            assert y.shape[-1] == out_features

    model = HierarchicalBNN(MLP(1, [8], 1), Laplace(), prior_scale=0.5)
    learner = bm.MetaLearner(model, "maml", inner_steps=1, inner_lr=0.01)
    learner.fit(Sinusoid(5, 5), meta_steps=2, meta_batch=2, progress=False)
    scores = bm.evaluate(learner, Sinusoid(5, 5), num_tasks=4, meta_batch=4)
    assert math.isfinite(scores["crps"]) and math.isfinite(scores["coverage_90"])
    path = learner.save(tmp_path / "l.pt")
    with pytest.raises(ValueError, match="'Laplace' is not one of bayesmeta's.*pass model="):
        bm.MetaLearner.load(path)
    fresh = HierarchicalBNN(MLP(1, [8], 1), Laplace(), prior_scale=0.5)
    assert isinstance(bm.MetaLearner.load(path, model=fresh).model.likelihood, Laplace)


def test_draw_based_crps_sees_the_spread_between_particles(float64):
    # Four particles far apart, each a Normal of scale s: the mixture's CRPS in closed form.
    loc = torch.tensor([-3.0, -1.0, 1.0, 3.0]).reshape(4, 1, 1, 1).expand(4, 2, 3, 1)
    raw = torch.full_like(loc, -1.0)
    s = torch.nn.functional.softplus(raw[0, 0, 0, 0]) + 1e-3
    hetero = Prediction(torch.cat([loc, raw], -1), "regression", likelihood=HeteroscedasticNormal())
    exact = Prediction(loc.clone(), "regression", noise=s)
    y = torch.randn(2, 3, 1)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(hetero.crps(y, g), exact.crps(y), rtol=0.08, atol=0.02)


def test_a_normal_predictions_spread_is_its_closed_form_to_the_bit():
    f = torch.randn(7, 2, 3, 1)
    noise = torch.tensor(0.3)
    pred = Prediction(f, "regression", noise=noise, likelihood=bm.models.Normal(0.3))
    assert torch.equal(pred.stddev, (f.var(0, unbiased=False) + noise.square()).sqrt())


def test_seeded_draws_leave_the_global_generator_alone():
    state = torch.get_rng_state()
    StudentT(df=4.0).sample(torch.zeros(2, 3, 1), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="df must be > 2"):
        StudentT(df=2.0)
