"""InferenceData from task posteriors: groups, dims, coords, and values against the model."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import Sinusoid
from bayesmeta.diagnostics import to_inference_data
from bayesmeta.nets import batched_forward

T, Q, CHAINS, DRAWS = 3, 7, 4, 15

# A barely trained model: ArviZ rightly warns about Pareto k and WAIC; the values are still finite.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning"),
    pytest.mark.filterwarnings("ignore:For one or more samples the posterior variance:UserWarning"),
    pytest.mark.filterwarnings("ignore:Passing a dict or None as alias_mapping"),
]


@pytest.fixture(scope="module")
def sinusoid_post():
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [8], 1), bm.models.Normal(noise=0.3))
    learner = bm.MetaLearner(model, method="bayes", inner_steps=2, inner_lr=0.003, particles=2)
    tasks = Sinusoid(5, Q, noise=0.3)
    learner.fit(tasks, meta_steps=3, meta_batch=2, progress=False)
    batch = tasks.sample(T, torch.Generator().manual_seed(1))
    post = learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    return learner, batch, post


@pytest.fixture(scope="module")
def idata(sinusoid_post):
    _, batch, post = sinusoid_post
    g = torch.Generator().manual_seed(0)
    return to_inference_data(
        post, (batch.query_x, batch.query_y), DRAWS, generator=g, chains=CHAINS
    )


def test_groups_dims_and_coords(sinusoid_post, idata):
    learner, batch, _ = sinusoid_post
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    assert list(idata.posterior.data_vars) == learner.model.names
    w = idata.posterior["body.0.weight"]
    assert w.dims == ("chain", "draw", "task", "body.0.weight_dim_0", "body.0.weight_dim_1")
    assert w.shape == (CHAINS, DRAWS, T, 8, 1)
    assert idata.posterior["head.bias"].dims == ("chain", "draw", "task", "head.bias_dim_0")
    assert idata.posterior.coords["task"].values.tolist() == list(range(T))
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "task", "query")
    assert idata.log_likelihood["obs"].shape == (CHAINS, DRAWS, T, Q)
    assert idata.posterior_predictive["obs"].dims == ("chain", "draw", "task", "query", "output")
    assert idata.observed_data["obs"].dims == ("task", "query", "output")
    np.testing.assert_array_equal(idata.observed_data["obs"].values, batch.query_y.numpy())
    np.testing.assert_array_equal(idata.constant_data["x"].values, batch.query_x.numpy())


def test_draws_are_the_guides_draws(sinusoid_post):
    """With one generator state, the posterior group holds exactly ``sample_weights``'s draws."""
    _, _, post = sinusoid_post
    data = to_inference_data(post, num_draws=DRAWS, generator=torch.Generator().manual_seed(5))
    expected = post.sample_weights(CHAINS * DRAWS, torch.Generator().manual_seed(5))
    for name, w in expected.items():
        got = data.posterior[name].values.reshape(CHAINS * DRAWS, *w.shape[1:])
        np.testing.assert_array_equal(got, w.numpy())
    assert set(data.groups()) == {"posterior"}


def test_progress_counts_every_draw_chunk_by_chunk(sinusoid_post):
    _, _, post = sinusoid_post
    calls = []
    to_inference_data(post, num_draws=50, progress=lambda done, total: calls.append((done, total)))
    total = CHAINS * 50
    assert calls[-1] == (total, total) and len(calls) == -(-total // 64)  # 64 draws a chunk
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # each call further


def test_log_likelihood_and_f_are_the_model_at_the_draws(sinusoid_post, idata):
    """Recompute f(x; w) and log N(y | f, noise) from one stored draw."""
    learner, batch, _ = sinusoid_post
    c, d = 2, 9
    w = {n: torch.from_numpy(idata.posterior[n].values[c, d]) for n in learner.model.names}
    f = batched_forward(learner.model.net, w, batch.query_x)
    noise = learner.model.likelihood.noise
    ll = torch.distributions.Normal(f.double(), noise.double()).log_prob(batch.query_y.double())
    np.testing.assert_allclose(idata.posterior_predictive["f"].values[c, d], f.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        idata.log_likelihood["obs"].values[c, d], ll.sum(-1).numpy(), rtol=1e-5, atol=1e-6
    )


def test_arviz_functions_work_unchanged(idata):
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(loo.se)
    assert loo.loo_i.shape == (T, Q)
    assert np.isfinite(az.waic(idata).elpd_waic)
    summary = az.summary(idata, var_names=["head.weight", "head.bias"])
    assert len(summary) == T * (8 + 1)
    assert summary["r_hat"].between(0.9, 1.2).all()  # independent draws
    az.plot_posterior(idata, var_names=["head.bias"])
    az.plot_ppc(idata, num_pp_samples=5, random_seed=0)


def test_point_estimate_repeats_its_draw():
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [4], 1), bm.models.Normal(noise=0.5), None)
    learner = bm.MetaLearner(model, method="maml", inner_steps=1, inner_lr=0.01)
    batch = Sinusoid(4, 3).sample(2, torch.Generator().manual_seed(0))
    post = learner.adapt(batch.support_x, batch.support_y)
    data = to_inference_data(post, (batch.query_x, batch.query_y), num_draws=5, chains=2)
    w = data.posterior["head.weight"].values
    assert w.shape[:2] == (2, 5) and (w == w[:1, :1]).all()
    np.testing.assert_allclose(w[0, 0], post.state["loc"]["head.weight"].numpy())
    assert np.isfinite(data.log_likelihood["obs"].values).all()


@pytest.mark.slow
def test_classification_coords():
    N, K, QC = 3, 2, 2
    net = bm.nets.Conv4(1, N, hidden=4, image_size=16)
    model = bm.models.HierarchicalBNN(net, bm.models.Categorical(), prior_scale=0.1)
    learner = bm.MetaLearner(model, method="bayes", inner_steps=1, inner_lr=0.1, particles=2)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(2, N * K, 1, 16, 16, generator=g), torch.rand(2, N * QC, 1, 16, 16)
    sy = torch.arange(N).repeat_interleave(K).expand(2, -1)
    qy = torch.arange(N).repeat_interleave(QC).expand(2, -1)
    post = learner.adapt(sx, sy)
    data = to_inference_data(post, (qx, qy), 6, ["head.weight", "head.bias"], chains=2)
    assert data.posterior["head.weight"].dims[:3] == ("chain", "draw", "task")
    assert data.posterior_predictive["obs"].dims == ("chain", "draw", "task", "query")
    assert data.posterior_predictive["probs"].dims == ("chain", "draw", "task", "query", "class")
    assert data.posterior_predictive.coords["class"].values.tolist() == list(range(N))
    obs = data.posterior_predictive["obs"].values
    assert obs.dtype.kind == "i" and obs.min() >= 0 and obs.max() < N
    np.testing.assert_allclose(data.posterior_predictive["probs"].values.sum(-1), 1.0, rtol=1e-6)
    assert "constant_data" not in data.groups()  # images are not stored
    assert np.isfinite(az.loo(data).elpd_loo)


def test_bad_arguments(sinusoid_post):
    _, batch, post = sinusoid_post
    with pytest.raises(ValueError, match="var_names"):
        to_inference_data(post, num_draws=10, max_size=100)
    with pytest.raises(ValueError, match="sample sites"):
        to_inference_data(post, var_names=["nope"])
    with pytest.raises(ValueError, match="points' x must be"):
        to_inference_data(post, (batch.query_x[:1], batch.query_y[:1]))
    with pytest.raises(ValueError, match=r"points must be inputs x \[T, Q, ...\], a pair"):
        to_inference_data(post, (None, batch.query_y))
    with pytest.raises(ValueError, match="a pair \\(x, y\\) or None, got tuple of 3"):
        to_inference_data(post, (batch.query_x, batch.query_y, batch.query_y))
    with pytest.raises(ValueError, match="num_draws"):
        to_inference_data(post, num_draws=0)
