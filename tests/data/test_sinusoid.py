"""Sinusoid regression tasks."""

from __future__ import annotations

import math

import pytest
import torch

from bayesmeta.data import Sinusoid, SinusoidParams, TaskBatch, TaskDistribution


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shapes_dtype_and_protocol(float64):
    # float64 default dtype: the tasks stay float32.
    dist = Sinusoid(shots=5, queries=7)
    assert isinstance(dist, TaskDistribution)
    assert (dist.shots, dist.queries) == (5, 7)
    batch = dist.sample(3, gen(0))
    assert isinstance(batch, TaskBatch) and not batch.is_classification
    assert batch.support_x.shape == batch.support_y.shape == (3, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (3, 7, 1)
    assert {t.dtype for t in (batch.support_x, batch.query_y)} == {torch.float32}


def test_targets_are_the_true_functions_within_the_ranges():
    dist = Sinusoid(10, 20, amplitude=(0.5, 2.0), phase=(1.0, 2.0), x_range=(-1.0, 3.0))
    batch, params = dist.sample(200, gen(1), return_params=True)
    assert isinstance(params, SinusoidParams) and params.amplitude.shape == (200,)
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        expected = params.amplitude[:, None, None] * torch.sin(x - params.phase[:, None, None])
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(params(x), y)
        assert x.min() >= -1.0 and x.max() <= 3.0
    assert params.amplitude.min() >= 0.5 and params.amplitude.max() <= 2.0
    assert params.phase.min() >= 1.0 and params.phase.max() <= 2.0
    # The ranges are covered, not just respected.
    assert params.amplitude.max() - params.amplitude.min() > 1.2


def test_default_ranges_are_finn_et_al():
    dist = Sinusoid(5, 5)
    assert dist.amplitude == (0.1, 5.0)
    assert dist.phase == (0.0, math.pi)
    assert dist.x_range == (-5.0, 5.0)
    assert dist.noise == 0.0


def test_noise_has_the_given_scale():
    batch, params = Sinusoid(50, 50, noise=0.3).sample(100, gen(2), return_params=True)
    residual = torch.cat(
        [batch.support_y - params(batch.support_x), batch.query_y - params(batch.query_x)]
    )
    # 10,000 draws: the standard error of the sample std is about 0.3 / sqrt(2e4) = 0.002.
    assert abs(residual.std().item() - 0.3) < 0.01
    assert abs(residual.mean().item()) < 0.01


def test_same_seed_same_batch_different_seed_different_batch():
    dist = Sinusoid(5, 5, noise=0.1)
    a, b, c = dist.sample(4, gen(7)), dist.sample(4, gen(7)), dist.sample(4, gen(8))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))


def test_none_uses_the_global_default_generator():
    dist = Sinusoid(3, 3)
    torch.manual_seed(11)
    a = dist.sample(2)
    torch.manual_seed(11)
    b = dist.sample(2)
    assert torch.equal(a.query_y, b.query_y)


def test_return_params_false_gives_only_the_batch():
    assert isinstance(Sinusoid(2, 2).sample(1, gen(0)), TaskBatch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shots=0, queries=5), "shots"),
        (dict(shots=5, queries=-1), "queries"),
        (dict(shots=2.5, queries=5), "shots"),
        (dict(shots=True, queries=5), "shots"),
        (dict(shots=5, queries=5, amplitude=(5.0, 0.1)), "amplitude"),
        (dict(shots=5, queries=5, phase=(0.0,)), "phase"),
        (dict(shots=5, queries=5, x_range=(0.0, math.inf)), "x_range"),
        (dict(shots=5, queries=5, noise=-0.1), "noise"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sinusoid(**kwargs)


@pytest.mark.parametrize("num_tasks", [0, -3])
def test_bad_num_tasks(num_tasks):
    with pytest.raises(ValueError, match="num_tasks"):
        Sinusoid(2, 2).sample(num_tasks, gen(0))


def test_params_check_their_input():
    _, params = Sinusoid(2, 2).sample(3, gen(0), return_params=True)
    with pytest.raises(ValueError, match=r"x must have shape \[T=3, B, 1\]"):
        params(torch.zeros(2, 5, 1))
    with pytest.raises(AttributeError):
        params.amplitude = torch.zeros(3)  # type: ignore[misc]
