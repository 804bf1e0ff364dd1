import torch
import torch.distributions as td
import torch.nn.functional as F

from bayesmeta.models import DeltaGuide, HierarchicalBNN, Normal, NormalGuide
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
