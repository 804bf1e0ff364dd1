"""The model and the guides are ordinary Pyro: Pyro's SVI (also jitted) trains θ and a guide's
parameters, Predictive samples the posterior predictive, and Pyro can read the model's graph."""

import pyro
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.inspect import get_model_relations

import bayesmeta as bm
from bayesmeta.models import DeltaGuide, HierarchicalBNN, Normal, NormalGuide


def _setup():
    torch.manual_seed(0)
    model = HierarchicalBNN(bm.nets.MLP(1, [8], 1), Normal(0.3), prior_scale=0.1)
    batch = bm.data.Sinusoid(5, 5).sample(3, torch.Generator().manual_seed(0))
    return model, batch


@pytest.mark.parametrize("guide_cls", [NormalGuide, DeltaGuide])
@pytest.mark.parametrize("loss_cls", [Trace_ELBO, JitTrace_ELBO])
def test_pyro_svi_trains_theta_and_the_guide(guide_cls, loss_cls):
    model, batch = _setup()
    guide = guide_cls().pyro_guide(model=model, num_tasks=3)
    theta = [p.detach().clone() for p in model.theta()]
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 0.01}), loss_cls())
    for _ in range(3):
        svi.step(batch.support_x, batch.support_y)
    assert all(not torch.equal(p.detach(), q) for p, q in zip(model.theta(), theta, strict=True))
    store = pyro.get_param_store()
    assert "guide.loc.head.weight" in store.keys()
    assert any(k.startswith("theta$$$net.") for k in store.keys())  # θ, as Pyro sees it
    start = model.prior_loc()["head.weight"].expand(3, 1, 8)
    assert not torch.allclose(store["guide.loc.head.weight"], start.detach())


def test_jit_and_plain_elbo_agree_and_predictive_samples():
    model, batch = _setup()
    guide = NormalGuide().pyro_guide(model=model, num_tasks=3)
    losses = []
    for loss in (Trace_ELBO(), JitTrace_ELBO()):
        pyro.set_rng_seed(4)
        losses.append(loss.loss(model.model, guide, batch.support_x, batch.support_y))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    draws = Predictive(model.model, guide=guide, num_samples=4, return_sites=["obs"])(batch.query_x)
    assert draws["obs"].shape == (4, 3, 5, 1)
    relations = get_model_relations(model.model, (batch.support_x, batch.support_y))
    assert set(relations["sample_sample"]["obs"]) == set(model.names)
    with pytest.raises(ValueError, match="needs a state, or model= and num_tasks="):
        NormalGuide().pyro_guide()
