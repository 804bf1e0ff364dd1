"""Random affine distortions: exact pixel moves, seeded draws, labels untouched, bad input."""

import pytest
import torch

from bayesmeta.data import FewShotClassification, RandomAffine, Sinusoid, affine_images


def _still(n):
    return torch.zeros(n, 2), torch.zeros(n), torch.ones(n)


def test_no_distortion_is_the_identity():
    x = torch.rand(3, 1, 7, 7)
    torch.testing.assert_close(affine_images(x, *_still(3)), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, w", [(6, 6), (4, 8)])
def test_a_one_pixel_shift_moves_every_pixel_and_fills_with_zero(h, w):
    x = torch.rand(2, 1, h, w)
    shift, angle, scale = _still(2)
    right = affine_images(x, shift + torch.tensor([1.0, 0.0]), angle, scale)
    torch.testing.assert_close(right[..., 1:], x[..., :-1], atol=1e-6, rtol=0)
    assert right[..., 0].abs().max() < 1e-6
    down = affine_images(x, shift + torch.tensor([0.0, 1.0]), angle, scale)
    torch.testing.assert_close(down[..., 1:, :], x[..., :-1, :], atol=1e-6, rtol=0)


def test_a_quarter_turn_is_rot90_and_a_zoom_out_keeps_the_ink_central():
    x = torch.rand(2, 1, 6, 6)
    shift, angle, scale = _still(2)
    turned = affine_images(x, shift, angle + 90.0, scale)
    torch.testing.assert_close(turned, torch.rot90(x, 1, (-2, -1)), atol=1e-6, rtol=0)
    small = affine_images(torch.ones(1, 1, 8, 8), *_still(1)[:2], torch.tensor([0.5]))
    assert small[0, 0, 3:5, 3:5].min() > 0.99 and small[0, 0, 0].max() == 0


def _tasks():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return FewShotClassification(images, torch.arange(40) % 5, ways=3, shots=1, queries=2)


def test_random_affine_is_seeded_keeps_labels_and_moves_images():
    tasks = _tasks()
    aug = RandomAffine(tasks, max_shift=2, max_rotation=15, max_scale=0.1)
    base = tasks.sample(4, torch.Generator().manual_seed(1))
    one = aug.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(one.support_y, base.support_y) and torch.equal(one.query_y, base.query_y)
    assert one.support_x.shape == base.support_x.shape and one.num_classes == 3
    assert (one.support_x - base.support_x).abs().amax((-3, -2, -1)).min() > 0  # every image
    again = aug.sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(again.support_x, one.support_x) and torch.equal(again.query_x, one.query_x)
    other = aug.sample(4, torch.Generator().manual_seed(2))
    assert not torch.equal(other.support_x, one.support_x)
    still = RandomAffine(tasks, 0, 0, 0).sample(4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(still.query_x, base.query_x, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_shift": -1}, "max_shift must be a number >= 0, got -1"),
        ({"max_rotation": "10"}, "max_rotation must be a number >= 0, got '10'"),
        ({"max_scale": 1.0}, "max_scale must be below 1.0, got 1.0"),
    ],
)
def test_bad_magnitudes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomAffine(_tasks(), **kwargs)


def test_only_image_tasks_can_be_distorted():
    with pytest.raises(TypeError, match="tasks must have .sample"):
        RandomAffine([1, 2])
    with pytest.raises(ValueError, match=r"needs image tasks, support_x \[T, S, C, H, W\]"):
        RandomAffine(Sinusoid(5, 5)).sample(2, torch.Generator().manual_seed(0))
