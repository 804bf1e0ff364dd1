"""batched_forward against per-task module forwards, exactly (float64, 1e-10)."""

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from bayesmeta.nets import (
    MLP,
    Conv4,
    batched_features,
    batched_forward,
    has_linear_head,
    head_parameter_names,
    linear_head,
    takes_context,
)
from bayesmeta.nets.conv4 import _choose_conv4_kernel, _conv4_grouped, _conv4_loop, _relu_max_pool2

ATOL = 1e-10
SLOW = pytest.mark.slow
P, T, B = 2, 3, 4


def small_conv4(image_size=32):
    # 32 leaves 2x2 pixels before the head, so the flatten order is tested too; 16 leaves 1x1.
    return Conv4(2, 3, hidden=8, image_size=image_size)


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2))


# (factory, per-example input shape)
NETS = {
    "mlp-relu": (lambda: MLP(3, [6, 5], 2), (3,)),
    "mlp-tanh": (lambda: MLP(3, [6], 2, activation="tanh"), (3,)),
    "conv4": (small_conv4, (2, 32, 32)),
    "conv4-16": (lambda: small_conv4(16), (2, 16, 16)),
    "conv1d-fallback": (conv1d_net, (2, 6)),
}


def _exact():
    return dict(rtol=0, atol=ATOL)


def make_params(net, lead, requires_grad=False):
    params = {
        name: p.detach() + 0.3 * torch.randn(*lead, *p.shape) for name, p in net.named_parameters()
    }
    return {k: v.requires_grad_(requires_grad) for k, v in params.items()}


def reference(net, params, x, lead, per_particle=False):
    """Per-(particle, task) ordinary module forwards, stacked to ``[*lead, B, ...]``."""
    index = list(itertools.product(*map(range, lead)))
    outs = [
        functional_call(
            net, {k: v[i] for k, v in params.items()}, (x[i] if per_particle else x[i[-1]],)
        )
        for i in index
    ]
    out = torch.stack(outs)
    return out.reshape(*lead, *out.shape[1:])


def _forward_cases():
    # Conv4 with particles takes seconds: the fast tier keeps it for tasks alone.
    leads = [((T,), False), ((P, T), False), ((P, T), True)]
    for name in NETS:
        for i, (lead, per_particle) in enumerate(leads):
            slow = name.startswith("conv4") and len(lead) == 2
            yield pytest.param(
                name,
                lead,
                per_particle,
                id=f"lead{i}-{per_particle}-{name}",
                marks=[SLOW] if slow else [],
            )


@pytest.mark.parametrize("name, lead, per_particle", _forward_cases())
def test_matches_per_task_forward(float64, name, lead, per_particle):
    factory, in_shape = NETS[name]
    net = factory()
    params = make_params(net, lead)
    x = torch.randn(*(lead if per_particle else (T,)), B, *in_shape)
    out = batched_forward(net, params, x)
    expected = reference(net, params, x, lead, per_particle)
    assert out.shape == expected.shape == (*lead, B, *expected.shape[len(lead) + 1 :])
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


# Seconds each: the fast tier keeps the CPU's kernel (the loop) without particles.
@pytest.mark.parametrize("norm", ["batch", "layer", "task"])
@pytest.mark.parametrize(
    "kernel", ["loop", pytest.param("grouped", marks=SLOW), pytest.param("vmap", marks=SLOW)]
)
@pytest.mark.parametrize("lead", [(T,), pytest.param((P, T), marks=SLOW)])
def test_conv4_with_a_context_matches_per_task_forward_and_maps_rows_alone(
    float64, norm, kernel, lead
):
    net = Conv4(2, 3, hidden=8, image_size=32, norm=norm)
    params = make_params(net, lead)
    x, context = torch.randn(T, B, 2, 32, 32), torch.randn(T, 3, 2, 32, 32)
    out = batched_forward(net, params, x, context=context, kernel=kernel)
    index = list(itertools.product(*map(range, lead)))
    expected = torch.stack(
        [
            functional_call(
                net, {k: v[i] for k, v in params.items()}, (x[i[-1]],), {"context": context[i[-1]]}
            )
            for i in index
        ]
    ).reshape(*lead, B, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    for b in range(B):
        alone = batched_forward(net, params, x[:, b : b + 1], context=context, kernel=kernel)
        torch.testing.assert_close(alone, out[..., b : b + 1, :], rtol=0, atol=ATOL)


def test_context_is_validated_and_passed_to_modules_that_take_one(float64):
    mlp = MLP(3, [4], 2)
    params = make_params(mlp, (T,))
    x = torch.randn(T, B, 3)
    # An MLP normalises nothing: the context changes nothing.
    torch.testing.assert_close(
        batched_forward(mlp, params, x, context=torch.randn(T, 2, 3)),
        batched_forward(mlp, params, x),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="context must have the task axis first"):
        batched_forward(mlp, params, x, context=torch.randn(T + 1, 2, 3))
    with pytest.raises(ValueError, match="context must end in the input shape"):
        batched_forward(mlp, params, x, context=torch.randn(T, 2, 4))
    # A module whose forward takes no context is called without it.
    net = conv1d_net()
    params, xc = make_params(net, (T,)), torch.randn(T, B, 2, 6)
    torch.testing.assert_close(
        batched_forward(net, params, xc, context=torch.randn(T, 2, 2, 6)),
        batched_forward(net, params, xc),
        **_exact(),
    )
    assert not takes_context(net) and takes_context(Conv4(1, 2, hidden=2, image_size=16))

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, context=None):
            ref = x if context is None else context
            return self.lin(x - ref.mean(0))

    net = Centred()
    params = make_params(net, (T,))
    context = torch.randn(T, 2, 3)
    out = batched_forward(net, params, x, context=context)
    for t in range(T):
        w = {k: v[t] for k, v in params.items()}
        expected = x[t] @ w["lin.weight"].T + w["lin.bias"] - context[t].mean(0) @ w["lin.weight"].T
        torch.testing.assert_close(out[t], expected, rtol=0, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["loop", "grouped", "vmap"])
def test_conv4_kernels_agree(float64, kernel):
    net = small_conv4()
    params = make_params(net, (P, T))
    x = torch.randn(T, B, 2, 32, 32)
    expected = reference(net, params, x, (P, T))
    out = batched_forward(net, params, x, kernel=kernel)
    torch.testing.assert_close(out, expected, **_exact())


def test_private_conv4_kernels_agree_directly(float64):
    net = small_conv4()
    flat = make_params(net, (5,))
    x = torch.randn(5, B, 2, 32, 32)
    torch.testing.assert_close(_conv4_grouped(net, flat, x), _conv4_loop(net, flat, x), **_exact())


def test_kernel_choice():
    assert _choose_conv4_kernel(torch.device("cpu"), 32) == "loop"
    assert _choose_conv4_kernel(torch.device("cuda"), 8) == "grouped"
    assert _choose_conv4_kernel(torch.device("cuda"), 1) == "loop"


SECOND_ORDER = [
    ("mlp-tanh", "auto"),
    ("conv4-16", "loop"),
    ("conv4-16", "grouped"),
    ("conv4-16", "vmap"),
    ("conv1d-fallback", "auto"),
]


@pytest.mark.parametrize("name, kernel", SECOND_ORDER)
def test_second_order_gradients_match_per_task(float64, name, kernel):
    factory, in_shape = NETS[name]
    net = factory()
    lead = (P, T)
    params = make_params(net, lead, requires_grad=True)
    x = torch.randn(T, B, *in_shape)
    names = list(params)
    # A fixed direction: the second gradient is a Hessian-vector product, as in MAML.
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def grad_and_hvp(ps, out, vs):
        grads = torch.autograd.grad(out.square().sum(), [ps[k] for k in names], create_graph=True)
        dot = sum((g * vs[k]).sum() for g, k in zip(grads, names, strict=True))
        return grads, torch.autograd.grad(dot, [ps[k] for k in names])

    grads, hvps = grad_and_hvp(params, batched_forward(net, params, x, kernel=kernel), direction)
    for p, t in itertools.product(range(P), range(T)):
        ps = {k: v.detach()[p, t].clone().requires_grad_() for k, v in params.items()}
        vs = {k: v[p, t] for k, v in direction.items()}
        ref_grads, ref_hvps = grad_and_hvp(ps, functional_call(net, ps, (x[t],)), vs)
        for k, g, h, rg, rh in zip(names, grads, hvps, ref_grads, ref_hvps, strict=True):
            torch.testing.assert_close(g[p, t], rg, **_exact(), msg=f"grad {k}")
            torch.testing.assert_close(h[p, t], rh, **_exact(), msg=f"hvp {k}")


@pytest.mark.parametrize("kernel", ["loop", "grouped", "vmap"])
def test_batchnorm_statistics_are_per_task_and_particle(float64, kernel):
    net = small_conv4(16)
    params = make_params(net, (P, T))
    x = torch.randn(P, T, B, 2, 16, 16)
    out = batched_forward(net, params, x, kernel=kernel)
    x2 = x.clone()
    x2[0, 0] = torch.randn(B, 2, 16, 16)
    out2 = batched_forward(net, params, x2, kernel=kernel)
    assert not torch.allclose(out2[0, 0], out[0, 0])
    mask = torch.ones(P, T, dtype=torch.bool)
    mask[0, 0] = False
    torch.testing.assert_close(out2[mask], out[mask], rtol=0, atol=0)


def test_head_parameter_names_of_other_modules():
    assert head_parameter_names(conv1d_net()) == ["3.weight", "3.bias"]
    with pytest.raises(ValueError, match="net"):
        head_parameter_names(nn.ReLU())


def _mlp_case():
    net = MLP(3, [4], 2)
    return net, make_params(net, (P, T)), torch.randn(T, B, 3)


def _drop(params, name):
    return {k: v for k, v in params.items() if k != name}


BAD_INPUTS = {
    "missing name": (lambda n, ps, x: (_drop(ps, "head.bias"), x, {}), "params"),
    "extra name": (lambda n, ps, x: ({**ps, "tail.weight": ps["head.weight"]}, x, {}), "params"),
    "trailing shape": (
        lambda n, ps, x: ({**ps, "head.bias": torch.zeros(P, T, 3)}, x, {}),
        r"params\['head.bias'\]",
    ),
    "no lead": (lambda n, ps, x: ({**ps, "head.bias": torch.zeros(2)}, x, {}), "params"),
    "three lead axes": (
        lambda n, ps, x: ({k: v.unsqueeze(0) for k, v in ps.items()}, x, {}),
        "params",
    ),
    "inconsistent lead": (
        lambda n, ps, x: ({**ps, "head.bias": torch.zeros(P, T + 1, 2)}, x, {}),
        "params",
    ),
    "task axis": (lambda n, ps, x: (ps, torch.randn(T + 1, B, 3), {}), "x"),
    "particle axis": (lambda n, ps, x: (ps, torch.randn(P + 1, T, B, 3), {}), "x"),
    "feature size": (lambda n, ps, x: (ps, torch.randn(T, B, 4), {}), "x"),
    "too few axes": (lambda n, ps, x: (ps, torch.randn(B, 3), {}), "x"),
    "unknown kernel": (lambda n, ps, x: (ps, x, {"kernel": "fft"}), "kernel"),
    "conv kernel for MLP": (lambda n, ps, x: (ps, x, {"kernel": "grouped"}), "kernel"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise(case):
    make, match = BAD_INPUTS[case]
    net, params, x = _mlp_case()
    params, x, kwargs = make(net, params, x)
    with pytest.raises(ValueError, match=match):
        batched_forward(net, params, x, **kwargs)


def test_bad_inputs_of_conv4_and_fallback_raise():
    net = small_conv4()
    params = make_params(net, (T,))
    with pytest.raises(ValueError, match="x"):
        batched_forward(net, params, torch.randn(T, B, 2, 28, 28))
    other = conv1d_net()
    with pytest.raises(ValueError, match="x"):
        batched_forward(other, make_params(other, (P, T)), torch.randn(T + 1, B, 2, 6))


@pytest.mark.parametrize("size", [8, 7])
def test_relu_max_pool_matches_torch_with_ties_and_odd_sides(float64, size):
    # Omniglot's flat background gives equal activations across whole windows, positive,
    # negative and zero: the gradient must reach the same element as max_pool2d's after ReLU,
    # although ours pools first and applies ReLU after.
    torch.manual_seed(0)
    raw = torch.randn(3, 4, size, size)
    raw[:, :2, : size // 2] = 0.5  # positive ties
    raw[:, 2:, :, : size // 2] = -1.0  # negative ties: zero after ReLU
    raw[:, 3, :, ::3] = 0.0  # zero tied with negatives
    v = torch.randn(3, 4, size // 2, size // 2)
    outs = {}
    for name, pool in (
        ("ours", _relu_max_pool2),
        ("torch", lambda h: F.max_pool2d(torch.relu(h), 2)),
    ):
        x = raw.clone().requires_grad_()
        out = pool(x)
        # Squared, so that the gradient depends on x through the pooling: the second
        # derivative then runs through the pooling backward's own backward.
        (grad,) = torch.autograd.grad((out.square() * v).sum(), x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * torch.cos(x)).sum(), x)
        outs[name] = (out, grad, hvp)
    for a, b in zip(outs["ours"], outs["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-tanh", "conv4", "conv4-16"])
@pytest.mark.parametrize("lead", [(T,), (P, T)])
def test_features_then_linear_head_is_the_forward(float64, name, lead):
    factory, in_shape = NETS[name]
    net = factory()
    params = make_params(net, lead)
    x = torch.randn(T, B, *in_shape)
    context = torch.randn(T, 3, *in_shape)
    features = batched_features(net, params, x, context=context)
    out = linear_head(params["head.weight"], params["head.bias"], features)
    torch.testing.assert_close(out, batched_forward(net, params, x, context=context), **_exact())
    # A body shared by the particles: features [T, B, F] serve weights [P, T, O, F].
    body = {k: v[0] if len(lead) == 2 else v for k, v in params.items() if k.startswith("body")}
    shared = batched_features(net, body, x, context=context)
    head = {
        k: torch.randn(P, T, *dict(net.named_parameters())[k].shape)
        for k in ("head.weight", "head.bias")
    }
    full = {**{k: v.expand(P, *v.shape) for k, v in body.items()}, **head}
    torch.testing.assert_close(
        linear_head(head["head.weight"], head["head.bias"], shared),
        batched_forward(net, full, x, context=context),
        **_exact(),
    )
    assert has_linear_head(net) and not has_linear_head(conv1d_net())
    with pytest.raises(ValueError, match="batched_features needs a Backbone"):
        batched_features(conv1d_net(), {}, x)
