"""The Backbone protocol: kernels stand for the class's own forward; checkpoints name classes."""

import torch

from bayesmeta.nets import BACKBONES, MLP, Conv4, batched_forward, has_linear_head
from bayesmeta.nets.backbone import own_kernels, saved_backbone
from bayesmeta.nets.memory import activation_bytes


class Shifted(MLP):  # a forward of its own: the MLP kernel would compute something else
    def forward(self, x):
        return super().forward(x) + 1.0


class Renamed(MLP):  # the same forward under another class name
    pass


def _weights(net, tasks=3):
    return {n: p.detach().expand(tasks, *p.shape).clone() for n, p in net.named_parameters()}


def test_a_subclass_that_overrides_forward_takes_the_generic_path():
    torch.manual_seed(0)
    net = Shifted(1, [4], 1)
    x = torch.randn(3, 5, 1)
    out = batched_forward(net, _weights(net), x)
    torch.testing.assert_close(out, net(x.reshape(15, 1)).reshape(3, 5, 1))
    assert own_kernels(net) is None and not has_linear_head(net)
    assert activation_bytes(net, 10) is None


def test_a_subclass_with_the_same_forward_keeps_the_kernels_but_not_the_name():
    net = Renamed(1, [4], 1)
    assert own_kernels(net) is net and has_linear_head(net)
    assert saved_backbone(net) is None  # "MLP" would rebuild another class
    assert saved_backbone(MLP(1, [4], 1))["type"] == "MLP"
    assert BACKBONES["MLP"] is MLP and BACKBONES["Conv4"] is Conv4


def test_the_shipped_backbones_estimate_their_activations():
    assert activation_bytes(MLP(1, [40, 40], 1), 10) == int(3.0 * 4 * 81 * 10)
    conv = Conv4(1, ways=5, hidden=8)
    per_point = 8 * (28 * 28 + 14 * 14 + 7 * 7 + 3 * 3)
    assert activation_bytes(conv, 2) == int(4.5 * 4 * per_point * 2)
