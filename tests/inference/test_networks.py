"""A user's own network: dropout off when predicting, batch normalisation that would share
statistics across tasks or queries refused at construction, and a head that can be named."""

import pytest
import torch
from torch import nn

import bayesmeta as bm


def _learner(net, method="maml", **kw):
    return bm.MetaLearner(
        bm.models.HierarchicalBNN(net, bm.models.Normal(0.3), prior_scale=None), method, **kw
    )


def test_predictions_switch_dropout_off_unless_asked():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    learner = _learner(net, inner_lr=0.001)
    batch = bm.data.Sinusoid(5, 5).sample(2, torch.Generator().manual_seed(0))
    post = learner.adapt(batch.support_x, batch.support_y)
    first, again = post.predict(batch.query_x).outputs, post.predict(batch.query_x).outputs
    assert torch.equal(first, again)
    assert not torch.equal(post.predict(batch.query_x, dropout=True).outputs, first)
    assert net.training  # the mode it had before


@pytest.mark.parametrize(
    "norm, match",
    [
        (nn.BatchNorm1d(4), "with running statistics, which are one set for the network"),
        (nn.BatchNorm1d(4, track_running_stats=False), "would depend on the other queries"),
    ],
)
def test_batch_statistics_shared_across_tasks_or_queries_are_refused(norm, match):
    net = nn.Sequential(nn.Linear(1, 4), norm, nn.Linear(4, 1))
    with pytest.raises(ValueError, match=match):
        _learner(net)
    if not norm.track_running_stats:  # the named comparison mode accepts it
        assert _learner(net, transductive=True).inner.transductive


class _HeadFirst(nn.Module):
    """A network whose head is registered before its body."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 1)
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


def test_the_head_can_be_named_when_it_is_not_the_last_layer():
    net = _HeadFirst()
    assert bm.nets.head_parameter_names(net) == ["body.0.weight", "body.0.bias"]  # the guess
    learner = _learner(net, "anil", adapt=["head.bias", "head.weight"], inner_lr=0.01)
    assert learner.inner.adapt == ("head.weight", "head.bias")  # in the network's order
    batch = bm.data.Sinusoid(5, 5).sample(2, torch.Generator().manual_seed(0))
    post = learner.adapt(batch.support_x, batch.support_y)
    moved = post.state["loc"]["head.weight"][0] - net.head.weight
    assert torch.isfinite(moved).all() and moved.abs().max() > 0
    assert torch.equal(post.state["loc"]["body.0.weight"][0], net.body[0].weight)
    with pytest.raises(ValueError, match=r"adapt names weights \['head.w'\] that _HeadFirst"):
        _learner(net, "anil", adapt=["head.w"])
    with pytest.raises(ValueError, match="adapt must be 'all', 'head' or a non-empty list"):
        _learner(net, "anil", adapt="body")
