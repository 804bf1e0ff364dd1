import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F

import bayesmeta as bm
from bayesmeta.inference import InnerConfig, inner_loop
from bayesmeta.models import AntitheticNormalGuide, DeltaGuide, HierarchicalBNN, Normal, NormalGuide
from bayesmeta.nets import MLP


def test_delta_guide_kl_is_the_negative_prior_log_density(float64):
    model = HierarchicalBNN(MLP(2, [3], 1), Normal(0.5), prior_scale=0.4)
    guide = DeltaGuide()
    state = guide.init(model, 4)
    g = torch.Generator().manual_seed(0)
    state = {"loc": {n: t + torch.randn(t.shape, generator=g) for n, t in state["loc"].items()}}
    for names in (None, ["head.weight", "body.0.bias"]):
        expected = -sum(
            model.prior(n).log_prob(w) for n, w in state["loc"].items() if not names or n in names
        )
        torch.testing.assert_close(guide.kl(state, model, names=names), expected)
    assert torch.equal(guide.kl(state, model, flat_prior=True), torch.zeros(4))


def test_normal_guide_kl_is_the_sum_of_the_weights_kls(float64):
    model = HierarchicalBNN(MLP(2, [3], 1), Normal(0.5), prior_scale=0.4)
    guide = NormalGuide()
    g = torch.Generator().manual_seed(1)
    state = {
        f: {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in v.items()}
        for f, v in guide.init(model, 4).items()
    }
    mu, sigma = model.prior_loc(), model.prior_scale()
    for names in (None, ["head.weight", "body.0.bias"]):
        expected = sum(
            td.kl_divergence(
                td.Normal(state["loc"][n], F.softplus(state["scale_raw"][n])),
                td.Normal(mu[n], sigma[n]),
            )
            .flatten(1)
            .sum(1)
            for n in state["loc"]
            if names is None or n in names
        )
        torch.testing.assert_close(guide.kl(state, model, names=names), expected)
    entropy = sum(
        td.Normal(0.0, F.softplus(r)).entropy().flatten(1).sum(1)
        for r in state["scale_raw"].values()
    )
    torch.testing.assert_close(guide.kl(state, model, flat_prior=True), -entropy)


def test_antithetic_draws_come_in_pairs_around_the_mean(float64):
    model = HierarchicalBNN(MLP(2, [3], 1), Normal(0.5), prior_scale=0.4)
    guide = AntitheticNormalGuide()
    state = guide.init(model, 4)
    for particles in (1, 4, 5):
        noise = guide.noise(state, particles, torch.Generator().manual_seed(particles))
        draws = guide.sample(state, particles, noise=noise)
        for name, w in draws.items():
            assert w.shape == (particles, 4, *model.shapes()[name])
            h = (particles + 1) // 2  # draw i pairs with draw i + h
            pairs = w[: particles - h] + w[h:particles]
            torch.testing.assert_close(pairs, 2 * state["loc"][name].expand_as(pairs))
    # Of an odd number, draw h − 1 is unpaired: an ordinary draw.
    loc = state["loc"]["head.bias"]
    assert not torch.allclose(draws["head.bias"][2], loc) and not torch.allclose(
        draws["head.bias"][2] + draws["head.bias"][0], 2 * loc
    )
    # Without the inner loop's noise (predictions, diagnostics) the draws are independent.
    free = guide.sample(state, 4, torch.Generator().manual_seed(4))["head.bias"]
    assert not torch.allclose(free[:2] + free[2:], 2 * loc.expand(2, *loc.shape))


def test_antithetic_pairs_make_a_quadratic_loss_mean_gradient_exact(float64):
    # The NLL of a linear model is quadratic in the weights, so its gradient is linear: a pair
    # m ± s·ε averages it to its expectation, the gradient at m, whatever ε is. One inner step
    # then moves the means to the same place for every seed; independent draws do not.
    model = HierarchicalBNN(MLP(2, [], 1), Normal(0.5), prior_scale=0.4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 6, 2, generator=g), torch.randn(3, 6, 1, generator=g)
    for guide, same in ((AntitheticNormalGuide(), True), (NormalGuide(), False)):
        config = InnerConfig(steps=1, particles=2)
        locs = [
            inner_loop(
                model, guide, x, y, config, lr=0.1, generator=torch.Generator().manual_seed(s)
            )
            for s in (1, 2)
        ]
        locs = [state["loc"]["head.weight"] for state in locs]
        assert torch.allclose(locs[0], locs[1], rtol=0, atol=1e-12) is same


@pytest.mark.parametrize(
    "method, guide, classes",
    [
        ("bayes", "normal", False),
        ("bayes", "normal-antithetic", False),
        ("bayes", "normal-local", False),
        ("maml", "delta", False),
        ("bmaml", "particles", False),
        ("bayes-head", "gaussian-head", False),
        ("bayes-head", "prototype-laplace", True),
        ("bayes-proto", "class-gaussian", True),
        ("protomaml", "delta", True),
    ],
)
def test_every_guide_keeps_the_fields_its_state_type_declares(method, guide, classes):
    # A state is a plain mapping (it checkpoints and slices by task as it is); each guide
    # declares its fields as a TypedDict, and holds to it through the inner steps.
    from typing import is_typeddict

    from bayesmeta.models import GUIDES, Categorical
    from bayesmeta.models.guides import PRIOR_LOC

    torch.manual_seed(0)
    T, S = 3, 8
    likelihood = Categorical() if classes else Normal(0.3)
    model = HierarchicalBNN(MLP(2, [6], 4 if classes else 1), likelihood, prior_scale=0.5)
    learner = bm.MetaLearner(model, method, guide=guide, inner_steps=2)
    assert type(learner.guide) is GUIDES[guide]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, S, 2, generator=g)
    y = torch.arange(S).remainder(4).expand(T, S) if classes else torch.randn(T, S, 1, generator=g)
    state = learner.adapt(x, y, generator=g).state
    declared = learner.guide.state_type
    assert is_typeddict(declared)
    assert declared.__required_keys__ <= set(state)
    assert set(state) <= declared.__required_keys__ | declared.__optional_keys__ | {PRIOR_LOC}
    for field in state.values():
        assert all(isinstance(t, torch.Tensor) and T in t.shape[:2] for t in field.values())
