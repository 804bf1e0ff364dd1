"""Comparisons that the exact inner-loop tests share."""

import torch
import torch.nn.functional as F

from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP

NOISE = 0.3


def sine_problem(hidden, T=3, S=6):
    """An MLP ``2 → hidden → 1`` under a Normal likelihood (noise :data:`NOISE`, prior σ 0.3)
    and ``T`` tasks of ``S`` noisy points of ``sin(x₁ + x₂)``."""
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(2, [hidden], 1), Normal(NOISE), prior_scale=0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, S, 2, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True)) + NOISE * torch.randn(T, S, 1, generator=g)
    return model, x, y


def adapted(state, names):
    """A Normal state's means, then its standard deviations, in ``names``' order."""
    return [state["loc"][n] for n in names] + [F.softplus(state["scale_raw"][n]) for n in names]


def assert_same_values_and_meta_gradients(got, want, theta):
    """``got`` equals ``want`` (float64, 1e-9) and so do their first derivatives in ``theta``
    along a random direction (1e-8), which must not all vanish."""
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(t.shape, generator=g) for t in got]
    d_got = torch.autograd.grad(got, theta, upstream)
    d_want = torch.autograd.grad(want, theta, upstream)
    for a, b in zip(d_got, d_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert all(d.abs().sum() > 0 for d in d_got)
