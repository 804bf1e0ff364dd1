import torch

from bayesmeta.models import DeltaGuide, HierarchicalBNN, Normal
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
