import pytest
import torch

from bayesmeta.nets import MLP, head_parameter_names


def test_forward_shape_and_names():
    net = MLP(3, [5, 7], 2)
    assert net(torch.randn(4, 3)).shape == (4, 2)
    assert [name for name, _ in net.named_parameters()] == [
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
        "head.weight",
        "head.bias",
    ]
    assert head_parameter_names(net) == ["head.weight", "head.bias"]


@pytest.mark.parametrize("activation, fn", [("relu", torch.relu), ("tanh", torch.tanh)])
def test_forward_is_the_textbook_formula(float64, activation, fn):
    net = MLP(2, [4], 3, activation=activation)
    x = torch.randn(5, 2)
    l0, head = net.body[0], net.head
    expected = fn(x @ l0.weight.T + l0.bias) @ head.weight.T + head.bias
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-12)


def test_no_hidden_layers_is_one_linear_layer():
    net = MLP(3, [], 1)
    assert len(net.body) == 0 and net.head.in_features == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(in_features=0, hidden=[4], out_features=1), "in_features"),
        (dict(in_features=1, hidden=[4], out_features=-1), "out_features"),
        (dict(in_features=True, hidden=[4], out_features=1), "in_features"),
        (dict(in_features=1, hidden=[4, 0], out_features=1), r"hidden\[1\]"),
        (dict(in_features=1, hidden=4, out_features=1), "hidden"),
        (dict(in_features=1, hidden=[4], out_features=1, activation="gelu"), "activation"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MLP(**kwargs)
