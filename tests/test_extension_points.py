"""A guide, a likelihood and a backbone of a user's own, each one class of this file, go
through everything the package does: train, predict, evaluate, export to ArviZ, save and
reload without being given again."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bayesmeta as bm
from bayesmeta.data import Sinusoid
from bayesmeta.diagnostics import to_inference_data
from bayesmeta.models import GUIDES, LIKELIHOODS, register_guide, register_likelihood
from bayesmeta.nets import BACKBONES, register_backbone


@register_likelihood
class LaplaceNoise(bm.models.Likelihood):
    """Laplace observations with a fixed scale: heavier tails than the Normal."""

    kind = "regression"

    def __init__(self, scale: float = 0.3):
        super().__init__()
        self.scale = scale

    def distribution(self, f):
        return torch.distributions.Independent(torch.distributions.Laplace(f, self.scale), 1)

    def log_prob(self, f, y):
        return torch.distributions.Laplace(f, self.scale).log_prob(y).sum(-1)

    def check_targets(self, y, out_features, name="y"):
        if y.dim() != 3 or y.shape[-1] != out_features:
            raise ValueError(f"{name} must be [T, B, {out_features}], got {tuple(y.shape)}")

    def spec(self):
        return {"scale": self.scale}


@register_backbone
class TanhNet(bm.nets.Backbone):
    """``head(tanh(body(x)))`` with a kernel of its own over all weight sets at once."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.body = torch.nn.Linear(1, width)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    input_shape = property(lambda self: (1,))

    def choose_kernel(self, device, groups):
        return "bmm"

    def batched(self, params, x, context, kernel, features=False):  # x [G, B, 1]
        w, b = params["body.weight"], params["body.bias"]
        h = torch.tanh(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)))
        if features:
            return h
        return bm.nets.linear_head(params["head.weight"], params["head.bias"], h)

    def activation_bytes(self, points):
        return 4 * 2 * self.width * points

    def spec(self):
        return {"width": self.width}


@register_guide("half-width")
class HalfWidth(bm.models.NormalGuide):
    """The mean-field Normal started at half the prior's scale."""

    def init(self, model, num_tasks, adapt=None, generator=None):
        state = super().init(model, num_tasks, adapt, generator)
        half = {n: torch.log(torch.expm1(F.softplus(r) / 2)) for n, r in state["scale_raw"].items()}
        return {**state, "scale_raw": half}


def test_a_guide_a_likelihood_and_a_backbone_of_ones_own(tmp_path):
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(TanhNet(), LaplaceNoise(0.3), prior_scale=0.1)
    learner = bm.MetaLearner(model, "bayes", guide="half-width", inner_steps=2)
    tasks = Sinusoid(shots=5, queries=5, noise=0.3)
    learner.fit(tasks, meta_steps=3, meta_batch=4, seed=0, progress=False)
    assert type(learner.guide) is HalfWidth and learner.skipped_steps == 0

    batch = tasks.sample(3, torch.Generator().manual_seed(1))
    post = learner.adapt(
        batch.support_x, batch.support_y, generator=torch.Generator().manual_seed(2)
    )
    pred = post.predict(batch.query_x, generator=torch.Generator().manual_seed(3))
    assert pred.mean.shape == (3, 5, 1) and torch.isfinite(pred.stddev).all()
    assert torch.isfinite(pred.log_prob(batch.query_y)).all()

    scores = bm.evaluate(learner, tasks, num_tasks=4, seed=5)
    assert {"mse", "nll", "crps"} <= set(scores) and all(
        torch.isfinite(torch.tensor(float(scores[k]))) for k in ("mse", "nll", "crps")
    )

    idata = to_inference_data(
        post,
        (batch.query_x, batch.query_y),
        num_draws=5,
        generator=torch.Generator().manual_seed(4),
    )
    assert {"posterior", "posterior_predictive", "log_likelihood"} <= set(idata.groups())
    assert "body.weight" in idata.posterior

    # Saved by name: the load rebuilds all three without being given the model or the guide.
    loaded = bm.MetaLearner.load(learner.save(tmp_path / "own.pt"))
    assert type(loaded.model.net) is TanhNet and loaded.model.net.width == 16
    assert type(loaded.model.likelihood) is LaplaceNoise and loaded.model.likelihood.scale == 0.3
    assert type(loaded.guide) is HalfWidth
    again = loaded.adapt(
        batch.support_x, batch.support_y, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(
        again.predict(batch.query_x, generator=torch.Generator().manual_seed(3)).mean, pred.mean
    )
    assert BACKBONES["TanhNet"] is TanhNet and LIKELIHOODS["LaplaceNoise"] is LaplaceNoise
    assert GUIDES["half-width"] is HalfWidth
