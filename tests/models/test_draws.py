"""Draws come from the generator's device, then move: one seed, the same numbers anywhere."""

import torch

from bayesmeta.models.draws import categorical, standard_normal


def test_standard_normal_is_torchs_draw_of_the_seed_in_the_asked_dtype():
    like = torch.zeros(2, dtype=torch.float64)
    got = standard_normal((3, 4), like, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    want = torch.empty(3, 4, dtype=torch.float64).normal_(generator=g)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_categorical_draws_one_class_per_row():
    probs = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    draws = categorical(probs, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and torch.equal(draws, torch.tensor([[1, 0], [2, 1]]))
    mixed = categorical(torch.full((4000, 2), 0.5), torch.Generator().manual_seed(1))
    assert 0.45 < mixed.double().mean() < 0.55
