import pytest
import torch

from bayesmeta.nets import Conv4, head_parameter_names


@pytest.mark.parametrize("image_size, side", [(16, 1), (28, 1), (84, 5)])
def test_head_sees_hidden_times_side_squared(image_size, side):
    net = Conv4(3, 5, hidden=4, image_size=image_size)
    assert net.head.in_features == 4 * side * side
    assert net(torch.randn(2, 3, image_size, image_size)).shape == (2, 5)


def test_parameter_names_and_head():
    net = Conv4(1, 5, hidden=8)
    names = [name for name, _ in net.named_parameters()]
    assert names[:4] == ["body.0.conv.weight", "body.0.conv.bias"] + [
        "body.0.norm.weight",
        "body.0.norm.bias",
    ]
    assert len(names) == 4 * 4 + 2
    assert head_parameter_names(net) == ["head.weight", "head.bias"]


def test_batchnorm_uses_batch_statistics_in_eval_too(float64):
    net = Conv4(1, 3, hidden=4, image_size=16)
    assert all(block.norm.running_mean is None for block in net.body)
    assert not list(net.buffers())
    x = torch.randn(6, 1, 16, 16)
    train_out = net(x)
    torch.testing.assert_close(net.eval()(x), train_out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(in_channels=0, ways=5), "in_channels"),
        (dict(in_channels=1, ways=0), "ways"),
        (dict(in_channels=1, ways=5, hidden=0), "hidden"),
        (dict(in_channels=1, ways=5, image_size=15), "image_size"),
        (dict(in_channels=1.0, ways=5), "in_channels"),
        (dict(in_channels=1, ways=True), "ways"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Conv4(**kwargs)


def test_zero_head_starts_the_classifier_at_zero_and_rejects_non_bools():
    torch.manual_seed(0)
    net = Conv4(1, 5, hidden=4, image_size=16, zero_head=True)
    assert torch.count_nonzero(net.head.weight) == 0 and torch.count_nonzero(net.head.bias) == 0
    logits = net(torch.randn(3, 1, 16, 16))
    assert torch.equal(logits, torch.zeros(3, 5))  # every class equally likely
    assert torch.count_nonzero(Conv4(1, 5, hidden=4, image_size=16).head.weight) > 0
    with pytest.raises(ValueError, match="zero_head must be a bool, got 'yes'"):
        Conv4(1, 5, zero_head="yes")


@pytest.mark.parametrize("norm", ["batch", "layer", "task"])
def test_each_image_is_mapped_on_its_own_given_a_context(float64, norm):
    net = Conv4(1, 3, hidden=4, image_size=16, norm=norm)
    x, context = torch.randn(5, 1, 16, 16), torch.randn(3, 1, 16, 16)
    whole = net(x, context)
    for i in range(len(x)):
        torch.testing.assert_close(net(x[i : i + 1], context), whole[i : i + 1], rtol=0, atol=1e-12)
    order = torch.randperm(len(x))
    torch.testing.assert_close(net(x[order], context), whole[order], rtol=0, atol=1e-12)


def test_batch_norm_takes_its_statistics_from_the_context_only(float64):
    net = Conv4(1, 3, hidden=4, image_size=16)
    x, context = torch.randn(4, 1, 16, 16), torch.randn(3, 1, 16, 16)
    # The context as its own batch: the same numbers as torch's batch norm in training mode.
    torch.testing.assert_close(net(context, context), net(context), rtol=0, atol=1e-10)
    # Without a context a batch is normalised with its own statistics (transductive).
    assert not torch.allclose(net(x[:1]), net(x)[:1])
    assert not torch.allclose(net(x, context), net(x, torch.randn(3, 1, 16, 16)))


def test_layer_norm_needs_no_batch_and_ignores_a_context(float64):
    net = Conv4(1, 3, hidden=4, image_size=16, norm="layer")
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(net(x[:1]), net(x)[:1], rtol=0, atol=1e-12)
    torch.testing.assert_close(net(x, torch.randn(2, 1, 16, 16)), net(x), rtol=0, atol=0)
    assert isinstance(net.body[0].norm, torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="norm must be one of .*, got .group."):
        Conv4(1, 3, norm="group")
