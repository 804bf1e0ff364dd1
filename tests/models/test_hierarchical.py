"""The hierarchical model's prior scales: one for all weights, one per tensor, or relative."""

import math

import pytest
import torch

from bayesmeta.models import Categorical, HierarchicalBNN, Normal, relative_prior_scale
from bayesmeta.nets import MLP, Conv4


def test_relative_scales_are_a_share_of_each_tensors_initial_size():
    torch.manual_seed(0)
    net = Conv4(1, ways=5, hidden=8, zero_head=True)
    scales = relative_prior_scale(net, 0.1)
    assert list(scales) == [n for n, _ in net.named_parameters()]
    w = net.body[1][0].weight
    assert scales["body.1.conv.weight"] == pytest.approx(0.1 * w.square().mean().sqrt().item())
    assert scales["body.0.norm.weight"] == pytest.approx(0.1)  # starts at ones
    assert scales["head.weight"] == 0.1  # starts at zero: the ratio itself
    model = HierarchicalBNN(net, Categorical(), prior_scale=scales)
    for name, sigma in model.prior_scale().items():
        torch.testing.assert_close(sigma, torch.full_like(sigma, scales[name]))


def test_per_tensor_scales_must_name_every_weight_with_a_positive_float():
    net = MLP(1, [4], 1)
    names = [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match=r"missing \['head.bias'\], unknown \['bogus'\]"):
        HierarchicalBNN(net, Normal(), prior_scale={**dict.fromkeys(names[:-1], 0.1), "bogus": 1})
    with pytest.raises(ValueError, match="got -0.1 for 'head.weight'"):
        HierarchicalBNN(
            net, Normal(), prior_scale={**dict.fromkeys(names, 0.1), "head.weight": -0.1}
        )
    with pytest.raises(ValueError, match="positive float.*got nan"):
        HierarchicalBNN(net, Normal(), prior_scale=math.nan)
    with pytest.raises(ValueError, match="ratio must be a positive float"):
        relative_prior_scale(net, 0)


def test_the_default_prior_is_what_the_backbone_declares():
    """ "auto": a Conv4's normalised body a tenth of each tensor's initial RMS and its head
    0.1; an MLP, and any module of a user's, 0.1 everywhere."""
    torch.manual_seed(0)
    net = Conv4(1, ways=5, hidden=8)
    expected = relative_prior_scale(net, 0.1)
    scales = HierarchicalBNN(net, Categorical()).prior_scale()
    for name, sigma in scales.items():
        want = 0.1 if name.startswith("head.") else expected[name]
        torch.testing.assert_close(sigma, torch.full_like(sigma, want))
    assert expected["head.weight"] < 0.05  # (the head is not relative: its σ is on the logits)
    for net in (MLP(1, [4], 1), torch.nn.Sequential(torch.nn.Linear(2, 3))):
        for sigma in HierarchicalBNN(net, Normal()).prior_scale().values():
            torch.testing.assert_close(sigma, torch.full_like(sigma, 0.1))
    with pytest.raises(ValueError, match="'auto' or None, got 'relative'"):
        HierarchicalBNN(MLP(1, [4], 1), Normal(), prior_scale="relative")
