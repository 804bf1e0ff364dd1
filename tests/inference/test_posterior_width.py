"""A Normal posterior's widths against its prior's (TaskPosterior.width_ratio)."""

import math

import pytest
import torch
import torch.nn.functional as F

import bayesmeta as bm
from bayesmeta.inference import TaskPosterior
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP


def _support(T=3, S=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(T, S, 1, generator=g), torch.randn(T, S, 1, generator=g)


def test_a_posterior_at_its_prior_has_ratio_one_and_set_widths_read_back(float64):
    scales = {"body.0.weight": 0.2, "body.0.bias": 0.05, "head.weight": 0.1, "head.bias": 0.3}
    model = HierarchicalBNN(MLP(1, [4], 1), Normal(0.5), prior_scale=scales)
    learner = bm.MetaLearner(model, "bayes")
    x, y = _support()
    post = learner.adapt(x, y, steps=0)  # (the posterior starts at the prior)
    ratios = post.width_ratio()
    assert set(ratios) == set(scales)
    for r in ratios.values():
        assert r.shape == (3,)
        torch.testing.assert_close(r, torch.ones(3, dtype=torch.float64))
    # Task t's body.0.weight at (t + 1)·(0.1, 0.2, 0.3, 0.4) of its prior σ: mean (t + 1)/4.
    state = {f: dict(v) for f, v in post.state.items()}
    share = torch.arange(1, 4.0).view(3, 1, 1) * torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1)
    raw = torch.log(torch.expm1(0.2 * share))  # softplus⁻¹
    state["scale_raw"] = {**state["scale_raw"], "body.0.weight": raw}
    moved = TaskPosterior(model, learner.guide, state).width_ratio()
    expected = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(moved["body.0.weight"], expected)
    torch.testing.assert_close(moved["head.bias"], torch.ones(3, dtype=torch.float64))
    assert math.isclose(float(F.softplus(raw[2, 3, 0])), 0.2 * 1.2, rel_tol=1e-12)


@pytest.mark.parametrize(
    "method, prior_scale, found",
    [("maml", None, "a flat prior"), ("map", 0.1, "DeltaGuide")],
)
def test_a_posterior_without_widths_is_told_what_width_ratio_needs(method, prior_scale, found):
    model = HierarchicalBNN(MLP(1, [4], 1), Normal(0.5), prior_scale=prior_scale)
    post = bm.MetaLearner(model, method).adapt(*_support(), steps=1)
    with pytest.raises(ValueError, match=f"width_ratio needs .*scale_raw.*{found}"):
        post.width_ratio()
