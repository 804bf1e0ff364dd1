"""The task families of the benchmark suites and their test conditions."""

from __future__ import annotations

from bayesmeta.bench.config import Family
from bayesmeta.bench.tasks import family_tasks
from bayesmeta.data import Omniglot


def test_omniglot_seen_alphabets_are_held_out_characters(omniglot_root):
    family = Family("o", "omniglot", 1, 1, ways=5)
    tasks = family_tasks(family, data_root=omniglot_root, held_out_fraction=0.2)
    pool = Omniglot(omniglot_root, 5, 1, 1, split="train", rotations=False)
    seen = tasks.conditions["seen_alphabets"].tasks
    assert seen.num_classes == round(0.2 * pool.num_characters)
    assert tasks.train.num_classes == 4 * (pool.num_characters - seen.num_classes)  # rotations
    assert tasks.train.num_images + seen.num_images == pool.num_images
    unseen = tasks.conditions["unseen_alphabets"].tasks
    assert not set(unseen.alphabets) & set(pool.alphabets)
