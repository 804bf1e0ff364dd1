"""The local reparameterisation trick against weight draws: moments, gradients, batching."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bayesmeta.nets import MLP, Conv4, batched_forward, local_forward
from bayesmeta.nets.backbone import has_local_kernel, local_linear
from bayesmeta.nets.conv4 import _Local


def _posterior(net, T, seed, spread=0.3):
    """Means at ``net``'s weights plus noise, variances ``(spread·u)²``, ``[T, *shape]``."""
    g = torch.Generator().manual_seed(seed)
    loc, var = {}, {}
    for name, p in net.named_parameters():
        loc[name] = p.detach() + 0.2 * torch.randn(T, *p.shape, generator=g)
        var[name] = (spread * torch.rand(T, *p.shape, generator=g)).square()
    return loc, var


def _stream(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g)


def test_a_linear_layer_draws_from_the_weight_draws_gaussian(float64):
    # One layer: the pre-activations are exactly Normal(h·m + b, h²·s² + v), which weight draws
    # reproduce in mean and variance (Monte Carlo, 40 000 draws, within 5 standard errors).
    net = MLP(3, [], 2)
    loc, var = _posterior(net, T=2, seed=0)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(2))
    got = local_forward(net, loc, var, x, lambda shape: eps.reshape(shape))[0]
    mean = x @ loc["head.weight"].transpose(1, 2) + loc["head.bias"].unsqueeze(1)
    variance = x.square() @ var["head.weight"].transpose(1, 2) + var["head.bias"].unsqueeze(1)
    torch.testing.assert_close(got, mean + variance.sqrt() * eps, rtol=0, atol=1e-12)

    n, g = 40_000, torch.Generator().manual_seed(3)
    w = loc["head.weight"] + var["head.weight"].sqrt() * torch.randn(n, 2, 2, 3, generator=g)
    b = loc["head.bias"] + var["head.bias"].sqrt() * torch.randn(n, 2, 2, generator=g)
    f = x @ w.transpose(-1, -2) + b.unsqueeze(-2)  # [n, T, B, O]
    se = (variance / n).sqrt()
    assert bool(((f.mean(0) - mean).abs() < 5 * se).all())
    assert bool(((f.var(0) - variance).abs() < 5 * variance * (2 / n) ** 0.5).all())


def test_a_deep_net_draws_as_if_each_point_drew_its_own_weights(float64):
    # Two hidden layers: the output's mean and variance per point match those of independent
    # weight draws per point (both by Monte Carlo, 20 000 draws, within 5 standard errors).
    net = MLP(2, [5, 4], 1, activation="tanh")
    loc, var = _posterior(net, T=1, seed=4)
    x = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(5))
    n = 20_000
    local = local_forward(net, loc, var, x, _stream(6), particles=n)[:, 0]  # [n, B, 1]
    g = torch.Generator().manual_seed(7)
    drawn = {
        k: loc[k][0] + var[k][0].sqrt() * torch.randn(n, 3, *loc[k].shape[1:], generator=g)
        for k in loc
    }  # [n, B, *shape]: a weight set per draw and point
    h = x[0].expand(n, 3, 2)
    for i, name in enumerate(["body.0", "body.1", "head"]):
        h = torch.einsum("nbi,nboi->nbo", h, drawn[f"{name}.weight"]) + drawn[f"{name}.bias"]
        h = torch.tanh(h) if i < 2 else h
    for a, b in ((local, h), (h, local)):
        se = (b.var(0) / n + a.var(0) / n).sqrt()
        assert bool(((a.mean(0) - b.mean(0)).abs() < 5 * se).all())
    ratio = local.var(0) / h.var(0)
    assert bool(((ratio - 1).abs() < 5 * (4 / n) ** 0.5).all())


def test_its_expected_gradients_are_the_elbo_s_in_the_means_and_the_scales(float64):
    # Linear regression with a Normal likelihood: E[NLL] = Σ ((y − h·m − b)² + h²·s² + s_b²)/2σ²
    # + const, quadratic in the pre-activations' noise: the draws ε = 1 and ε = −1 (mean 0,
    # variance 1) average the gradients in m and s to its exact gradients.
    net, sigma = MLP(3, [], 1), 0.5
    loc, var = _posterior(net, T=2, seed=8)
    scale = {k: v.sqrt().requires_grad_() for k, v in var.items()}
    loc = {k: v.requires_grad_() for k, v in loc.items()}
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 1, generator=g)
    eps = torch.ones(2, 6, 1)
    grads = []
    for sign in (1, -1):
        sq = {k: s.square() for k, s in scale.items()}
        f = local_forward(net, loc, sq, x, lambda shape, e=sign * eps: e.reshape(shape))[0]
        nll = ((y - f).square() / (2 * sigma**2)).sum()
        grads.append(torch.autograd.grad(nll, [*loc.values(), *scale.values()]))
    got = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
    w, b = loc["head.weight"], loc["head.bias"]
    sw, sb = scale["head.weight"], scale["head.bias"]
    mean = x @ w.transpose(1, 2) + b.unsqueeze(1)
    expected = (
        (y - mean).square() + x.square() @ sw.square().transpose(1, 2) + sb.square().unsqueeze(1)
    ).sum() / (2 * sigma**2)
    want = torch.autograd.grad(expected, [*loc.values(), *scale.values()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _Recorder:
    """A noise source that records its draws ``[G, B, ...]``, and replays one group's."""

    def __init__(self, seed):
        self.g, self.draws = torch.Generator().manual_seed(seed), []

    def __call__(self, shape):
        self.draws.append(torch.randn(shape, generator=self.g))
        return self.draws[-1]

    def replay(self, groups):
        it = iter(self.draws)
        return lambda shape: next(it)[groups].reshape(shape)


NETS = {
    "mlp": (lambda: MLP(3, [6, 5], 2), (3,)),
    "conv4": (lambda: Conv4(2, 3, hidden=4, image_size=16), (2, 16, 16)),
    "conv4-layer": (lambda: Conv4(2, 3, hidden=4, image_size=16, norm="layer"), (2, 16, 16)),
}


@pytest.mark.parametrize("name", NETS)
def test_batched_over_tasks_equals_each_task_alone(float64, name):
    factory, shape = NETS[name]
    torch.manual_seed(0)
    net, P, T, B = factory(), 2, 3, 4
    loc, var = _posterior(net, T, seed=10, spread=0.05)
    del var["head.bias"]  # (a point weight among spread ones)
    x = torch.randn(T, B, *shape, generator=torch.Generator().manual_seed(11))
    noise = _Recorder(12)
    got = local_forward(net, loc, var, x, noise, particles=P)  # [P, T, B, O]
    assert len(noise.draws) > 1 and noise.draws[0].shape[:2] == (P * T, B)
    for t in range(T):
        alone = local_forward(
            net,
            {k: v[t : t + 1] for k, v in loc.items()},
            {k: v[t : t + 1] for k, v in var.items()},
            x[t : t + 1],
            noise.replay(torch.arange(P) * T + t),
            particles=P,
        )
        torch.testing.assert_close(got[:, t], alone[:, 0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", NETS)
def test_without_spread_it_is_the_batched_forward(float64, name):
    factory, shape = NETS[name]
    torch.manual_seed(0)
    net = factory()
    loc, var = _posterior(net, T=2, seed=15)
    x = torch.randn(2, 5, *shape, generator=torch.Generator().manual_seed(16))
    zero = {k: torch.zeros_like(v) for k, v in var.items()}
    got = local_forward(net, loc, zero, x, _stream(17))[0]
    torch.testing.assert_close(got, batched_forward(net, loc, x), rtol=0, atol=1e-9)


def test_a_convolution_draws_from_the_weight_draws_gaussian(float64):
    # One convolution: mean conv(h, M) + b and variance conv(h², V) + v, against 20 000
    # sampled kernels (within 5 standard errors).
    g = torch.Generator().manual_seed(18)
    h = torch.randn(3, 2, 5, 5, generator=g)  # [B, Cin, H, W], one group
    m, v = torch.randn(4, 2, 3, 3, generator=g), 0.1 * torch.rand(4, 2, 3, 3, generator=g)
    mb, vb = torch.randn(4, generator=g), 0.1 * torch.rand(4, generator=g)
    local = _Local({"c.weight": v.unsqueeze(0), "c.bias": vb.unsqueeze(0)}, torch.ones, 1)
    conv = partial(F.conv2d, padding=1, groups=1)
    mean = conv(h, m, mb)
    variance = (local.conv(mean, h, "c", conv) - mean).square()  # (ε = 1)
    n = 20_000
    w = m + v.sqrt() * torch.randn(n, *m.shape, generator=g)
    b = mb + vb.sqrt() * torch.randn(n, 4, generator=g)
    f = torch.stack([conv(h, w[i], b[i]) for i in range(n)])
    assert bool(((f.mean(0) - mean).abs() < 5 * (variance / n).sqrt()).all())
    assert bool(((f.var(0) / variance - 1).abs() < 5 * (2 / n) ** 0.5).all())


def test_point_weights_draw_nothing(float64):
    # Without variances the local forward is the plain forward and asks for no noise.
    net = MLP(3, [4], 2)
    h, w, b = torch.randn(2, 5, 3), torch.randn(2, 2, 3), torch.randn(2, 2)

    def refuse(shape):
        raise AssertionError("drew noise for point weights")

    out = local_linear(h, w, b, None, None, refuse)
    torch.testing.assert_close(out, h @ w.transpose(1, 2) + b.unsqueeze(1))
    loc, _ = _posterior(net, T=2, seed=13)
    assert local_forward(net, loc, {}, torch.randn(2, 5, 3), refuse).shape == (1, 2, 5, 2)


def test_bad_arguments_are_named():
    net = MLP(3, [4], 2)
    loc, var = _posterior(net, T=2, seed=14)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="var must map names of loc .* unknown \\['nope'\\]"):
        local_forward(net, loc, {**var, "nope": var["head.bias"]}, x, torch.randn)
    with pytest.raises(ValueError, match="shape differs \\['head.bias'\\]"):
        local_forward(net, loc, {**var, "head.bias": var["head.weight"]}, x, torch.randn)
    conv = Conv4(1, 2, hidden=4, image_size=16, norm="task")
    assert has_local_kernel(net) and has_local_kernel(Conv4(1, 2)) and not has_local_kernel(conv)
    with pytest.raises(ValueError, match="a local kernel .* got Conv4"):
        x = torch.randn(2, 3, 1, 16, 16)
        local_forward(conv, *_posterior(conv, T=2, seed=0), x, torch.randn)
