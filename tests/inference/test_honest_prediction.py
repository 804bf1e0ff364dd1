"""A query's prediction depends on its task's support set, θ and the draws, never on the other
queries: alone, in any batch and in any order it gets the same probabilities."""

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import FewShotClassification, Sinusoid

METHODS = sorted(bm.inference.METHODS)
T, N, K, Q = 2, 3, 2, 4


def _images() -> FewShotClassification:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6 * 8, 1, 16, 16), generator=g, dtype=torch.uint8)
    return FewShotClassification(images, torch.arange(6).repeat_interleave(8), N, K, Q)


def _learner(backbone: str, method: str, transductive: bool = False) -> bm.MetaLearner:
    torch.manual_seed(0)
    flat = method in ("maml", "fomaml", "reptile", "metasgd", "anil")
    if backbone == "mlp":
        net, lik, lr = bm.nets.MLP(1, [8], 1), bm.models.Normal(0.3), 0.01
    else:
        norm = backbone.split("-")[1]
        net, lik, lr = bm.nets.Conv4(1, N, hidden=4, image_size=16, norm=norm), None, 0.1
        lik = bm.models.Categorical()
    model = bm.models.HierarchicalBNN(net, lik, prior_scale=None if flat else 0.1)
    return bm.MetaLearner(
        model, method, inner_steps=2, inner_lr=lr, eval_particles=3, transductive=transductive
    )


def _outputs(post, x, seed=1):
    return post.predict(x, generator=torch.Generator().manual_seed(seed)).outputs


# Conv4 takes seconds per method; the fast tier keeps the MLP for every method and Conv4's
# batch statistics in the transductive test below.
CONV4 = pytest.mark.slow


@pytest.mark.parametrize(
    "backbone",
    [pytest.param("conv4-batch", marks=CONV4), pytest.param("conv4-layer", marks=CONV4), "mlp"],
)
@pytest.mark.parametrize("method", METHODS)
def test_a_query_alone_is_predicted_as_inside_any_batch(backbone, method):
    tasks = Sinusoid(K, Q) if backbone == "mlp" else _images()
    if backbone == "mlp" and "regression" not in bm.inference.METHODS[method].kinds:
        with pytest.raises(ValueError, match="applies to classification"):
            _learner(backbone, method)
        return
    learner = _learner(backbone, method)
    batch = tasks.sample(T, torch.Generator().manual_seed(5))
    tol = dict(rtol=1e-4, atol=1e-5)  # float32: convolutions of other batch sizes round apart
    for trained in (False, True):
        if trained:
            learner.fit(tasks, meta_steps=2, meta_batch=T, progress=False)
        post = learner.adapt(batch.support_x, batch.support_y)
        whole = _outputs(post, batch.query_x)  # [P, T, Q, O]
        for i in range(batch.query_x.shape[1]):
            alone = _outputs(post, batch.query_x[:, i : i + 1])
            torch.testing.assert_close(alone, whole[:, :, i : i + 1], **tol)
        # Each task's queries in its own order, and the same images twice over.
        order = torch.stack([torch.randperm(whole.shape[2]) for _ in range(T)])
        shuffled = batch.query_x[torch.arange(T).unsqueeze(1), order]
        expected = whole[:, torch.arange(T).unsqueeze(1), order]
        torch.testing.assert_close(_outputs(post, shuffled), expected, **tol)
        doubled = _outputs(post, torch.cat([batch.query_x, batch.query_x], 1))
        torch.testing.assert_close(doubled[:, :, : whole.shape[2]], whole, **tol)


def test_transductive_prediction_is_a_named_option_that_does_depend_on_the_batch(tmp_path):
    tasks = _images()
    batch = tasks.sample(T, torch.Generator().manual_seed(5))
    honest, transductive = _learner("conv4-batch", "maml"), _learner("conv4-batch", "maml", True)
    assert honest.config()["transductive"] is False
    assert transductive.config()["transductive"] is True
    posts = [m.adapt(batch.support_x, batch.support_y) for m in (honest, transductive)]
    assert posts[0].context is not None and posts[1].context is None
    # Same θ, same adapted weights (the support normalises itself either way) ...
    for a, b in zip(posts[0].state["loc"].values(), posts[1].state["loc"].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... but a lone query is normalised by itself in transductive mode.
    alone = _outputs(posts[1], batch.query_x[:, :1])
    assert not torch.allclose(alone, _outputs(posts[1], batch.query_x)[:, :, :1], atol=1e-3)
    # The choice is saved and comes back.
    copy = bm.MetaLearner.load(transductive.save(tmp_path / "t.pt"))
    assert copy.inner.transductive is True
