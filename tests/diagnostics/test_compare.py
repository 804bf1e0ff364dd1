"""NUTS reference as InferenceData, SVI-vs-NUTS tables, forest plots, learner comparison."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bayesmeta as bm
import bayesmeta.diagnostics as dg
from bayesmeta.data import Sinusoid
from bayesmeta.inference.mcmc import mcmc_weights, nuts_reference

CHAINS, SAMPLES = 2, 8


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [4], 1), bm.models.Normal(noise=0.3))
    learner = bm.MetaLearner(model, method="bayes", inner_steps=2, inner_lr=0.003, particles=2)
    tasks = Sinusoid(5, 6, noise=0.3)
    batch = tasks.sample(2, torch.Generator().manual_seed(1))
    post = learner.adapt(batch.support_x, batch.support_y, generator=torch.Generator())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # chains drawn sequentially on 2 cores
        mcmc = nuts_reference(
            model,
            batch.support_x,
            batch.support_y,
            num_samples=SAMPLES,
            warmup_steps=6,
            num_chains=CHAINS,
        )
    return learner, tasks, batch, post, mcmc


def test_from_mcmc(run):
    learner, _, batch, _, mcmc = run
    data = dg.from_mcmc(mcmc, learner.model, (batch.query_x, batch.query_y))
    assert {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    } <= set(data.groups())
    w = data.posterior["body.0.weight"]
    assert w.dims == ("chain", "draw", "task", "body.0.weight_dim_0", "body.0.weight_dim_1")
    assert w.shape == (CHAINS, SAMPLES, 2, 4, 1)
    stored = mcmc_weights(mcmc, group_by_chain=True)["head.weight"].numpy()
    np.testing.assert_array_equal(data.posterior["head.weight"].values, stored)
    assert data.sample_stats["diverging"].dims == ("chain", "draw")
    assert data.sample_stats["diverging"].dtype == bool
    assert data.log_likelihood["obs"].dims == ("chain", "draw", "task", "query")
    rhat, ess = az.rhat(data), az.ess(data)
    assert rhat["head.bias"].shape == (2, 1) and np.isfinite(ess["head.bias"].values).all()


def test_compare_posteriors_uses_exact_moments(run):
    learner, _, _, post, mcmc = run
    table = dg.compare_posteriors(post, mcmc, task=1)
    assert len(table) == sum(p.numel() for p in learner.model.net.parameters())
    assert list(table.columns) == [
        "mean_svi",
        "mean_mcmc",
        "mean_diff",
        "sd_svi",
        "sd_mcmc",
        "sd_diff",
        "z",
    ]
    row = table.loc["head.weight[0, 2]"]
    assert row["mean_svi"] == pytest.approx(float(post.state["loc"]["head.weight"][1, 0, 2]))
    sd = F.softplus(post.state["scale_raw"]["head.weight"][1, 0, 2])
    assert row["sd_svi"] == pytest.approx(float(sd))
    draws = mcmc_weights(mcmc)["head.weight"][:, 1, 0, 2].double()
    assert row["mean_mcmc"] == pytest.approx(float(draws.mean()))
    assert row["sd_mcmc"] == pytest.approx(float(draws.std()))
    assert np.allclose(table["mean_diff"], table["mean_svi"] - table["mean_mcmc"])
    with pytest.raises(ValueError, match="task must be in"):
        dg.compare_posteriors(post, mcmc, task=5)


def test_forest_plot(run):
    _, _, _, post, mcmc = run
    axes = dg.forest_plot(post, mcmc, task=0, num_draws=20)
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert set(labels) == {"SVI", "NUTS"}
    import matplotlib.pyplot as plt

    plt.close("all")


def test_compare_learners(run):
    learner, tasks, _, _, _ = run
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [4], 1), bm.models.Normal(noise=0.3), None)
    maml = bm.MetaLearner(model, method="maml", inner_steps=2, inner_lr=0.003)
    learners = {"bayes": learner, "maml": maml}
    table = dg.compare_learners(learners, tasks, num_tasks=3, num_draws=10)
    assert sorted(table.index) == ["bayes", "maml"]
    assert table["elpd_heldout"].is_monotonic_decreasing  # ranked by the held-out score
    assert {"weight", "dse", "elpd_loo_support", "p_loo_support", "pareto_k_bad"} <= set(table)
    assert np.isfinite(table[["elpd_heldout", "elpd_loo_support", "dse"]].values).all()
    # A point estimate: held-out and in-sample scores are plain log-likelihoods, p_loo = 0.
    batch = tasks.sample(3, generator=torch.Generator().manual_seed(0))
    post = maml.adapt(batch.support_x, batch.support_y)
    fit = post.predict(batch.support_x).log_prob(batch.support_y).sum().item()
    test = post.predict(batch.query_x).log_prob(batch.query_y).sum().item()
    row = table.loc["maml"]
    assert row["elpd_heldout"] == pytest.approx(test, rel=1e-5)
    assert row["elpd_loo_support"] == pytest.approx(fit, rel=1e-5)
    assert row["p_loo_support"] == pytest.approx(0.0, abs=1e-6)

    by_loo = dg.compare_learners(learners, tasks, num_tasks=3, num_draws=10, score="loo")
    assert by_loo["elpd_loo"].is_monotonic_decreasing
    assert by_loo.loc["maml", "elpd_loo"] == pytest.approx(fit, rel=1e-5)
    with pytest.raises(ValueError, match="score"):
        dg.compare_learners(learners, tasks, score="waic")
