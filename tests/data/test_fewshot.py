"""N-way K-shot sampling over an in-memory image set."""

from __future__ import annotations

import pytest
import torch

from bayesmeta.data import FewShotClassification, TaskBatch, TaskDistribution


def gen(seed):
    return torch.Generator().manual_seed(seed)


def image_set(counts=(6, 7, 8, 9, 10, 11, 12), size=4):
    """Random uint8 images; class ``c`` has ``counts[c]`` images, stored in shuffled order."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=gen(0))]
    images = torch.randint(0, 256, (len(labels), 1, size, size), dtype=torch.uint8)
    return images, labels


def test_attributes_and_protocol():
    images, labels = image_set()
    dist = FewShotClassification(images, labels, ways=5, shots=2, queries=3)
    assert isinstance(dist, TaskDistribution)
    assert (dist.ways, dist.shots, dist.queries) == (5, 2, 3)
    assert dist.num_classes == 7 and dist.num_images == len(labels)
    assert dist.image_shape == (1, 4, 4)
    assert dist.class_names == [str(c) for c in range(7)]
    assert dist.device == torch.device("cpu")
    assert "ways=5" in repr(dist)


def test_sample_gathers_the_sampled_indices(float64):
    images, labels = image_set()
    dist = FewShotClassification(images, labels, 3, 2, 4)
    batch, ix = dist.sample(5, gen(3)), dist.sample_indices(5, gen(3))
    assert isinstance(batch, TaskBatch) and batch.num_classes == 3
    assert batch.support_x.shape == (5, 6, 1, 4, 4) and batch.query_x.shape == (5, 12, 1, 4, 4)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    torch.testing.assert_close(batch.support_x, images[ix.support].float() / 255)
    torch.testing.assert_close(batch.query_x, images[ix.query].float() / 255)
    assert 0 <= batch.query_x.min() and batch.query_x.max() <= 1


def test_many_tasks_are_valid_and_cover_the_set():
    images, labels = image_set()
    N, K, Q, T = 4, 2, 4, 200
    dist = FewShotClassification(images, labels, N, K, Q)
    ix = dist.sample_indices(T, gen(5))
    batch = dist.sample(T, gen(5))
    assert ix.support.shape == (T, N * K) and ix.query.shape == (T, N * Q)
    for t in range(T):
        s, q = ix.support[t].tolist(), ix.query[t].tolist()
        assert len(set(s + q)) == len(s) + len(q), "an image is drawn twice in one task"
        assert len(set(ix.classes[t].tolist())) == N, "a class is drawn twice in one task"
        for y in (batch.support_y[t], batch.query_y[t]):
            assert torch.equal(y.sort().values, torch.arange(N).repeat_interleave(len(y) // N))
    # Class-major layout: entry n * K + k has label n and comes from the class labelled n.
    assert torch.equal(batch.support_y, torch.arange(N).repeat_interleave(K).expand(T, -1))
    assert torch.equal(labels[ix.support].view(T, N, K), ix.classes[..., None].expand(T, N, K))
    assert torch.equal(labels[ix.query].view(T, N, Q), ix.classes[..., None].expand(T, N, Q))
    # Every class, and every image of the padded index table, is drawn; labels are shuffled.
    assert set(ix.classes.flatten().tolist()) == set(range(7))
    assert set(torch.cat([ix.support, ix.query], 1).flatten().tolist()) == set(range(len(labels)))
    assert len(set(ix.classes[:, 0].tolist())) == 7


def test_classes_and_images_are_drawn_uniformly():
    labels = torch.arange(10).repeat_interleave(torch.tensor([5] * 9 + [20]))
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    dist = FewShotClassification(images, labels, 5, 1, 1)
    ix = dist.sample_indices(4000, gen(9))
    class_counts = torch.bincount(ix.classes.flatten(), minlength=10).float()
    # Each class is in a task with probability 1/2: 2000 expected, sd about 32.
    assert (class_counts - 2000).abs().max() < 150
    big = torch.cat([ix.support, ix.query], 1)
    big = big[labels[big] == 9]
    image_counts = torch.bincount(big - 45, minlength=20).float()
    # Class 9 is in about 2000 tasks with 2 of its 20 images: 200 per image, sd about 13.
    assert (image_counts - image_counts.mean()).abs().max() < 60


def test_same_seed_same_batch_different_seed_different_batch():
    dist = FewShotClassification(*image_set(), 3, 1, 2)
    a, b, c = dist.sample(4, gen(1)), dist.sample(4, gen(1)), dist.sample(4, gen(2))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)
    torch.manual_seed(4)
    d = dist.sample(4)
    torch.manual_seed(4)
    assert torch.equal(d.query_x, dist.sample(4).query_x)


def test_rotated_classes():
    images, labels = image_set()
    dist = FewShotClassification(images, labels, 5, 2, 3, class_names=list("abcdefg"))
    rotated = FewShotClassification(images, labels, 5, 2, 3, list("abcdefg"), rotate_classes=True)
    assert dist.num_classes == 7 and rotated.num_classes == 28
    assert rotated.class_names[:8] == list("abcdefg") + ["a@rot90"]
    assert rotated.class_names[-1] == "g@rot270"
    T = 300
    ix, batch = rotated.sample_indices(T, gen(6)), rotated.sample(T, gen(6))
    base, turns = ix.classes % 7, ix.classes // 7
    assert set(turns.flatten().tolist()) == {0, 1, 2, 3}
    assert all(len(set(b.tolist())) == 5 for b in base), "two turns of one class in a task"
    assert torch.equal(labels[ix.support].view(T, 5, 2), base[..., None].expand(T, 5, 2))
    expected = images[ix.support].float() / 255
    for t in range(T):
        for j in range(10):
            turn = int(turns[t, j // 2])
            expected[t, j] = torch.rot90(expected[t, j], turn, dims=(-2, -1))
    torch.testing.assert_close(batch.support_x, expected)


def test_to_moves_the_images():
    dist = FewShotClassification(*image_set(), 3, 1, 1)
    assert dist.to("cpu") is dist and dist.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sampling_on_the_gpu_matches_the_cpu():
    dist = FewShotClassification(*image_set(), 3, 2, 2, rotate_classes=True)
    cpu = dist.sample(8, gen(0))
    gpu = dist.to("cuda").sample(8, gen(0))
    assert gpu.support_x.is_cuda and gpu.query_y.is_cuda
    assert torch.equal(cpu.support_x, gpu.support_x.cpu())
    assert torch.equal(cpu.query_x, gpu.query_x.cpu())


def test_integer_labels_of_any_width():
    images, labels = image_set()
    dist = FewShotClassification(images, labels.to(torch.int32), 2, 1, 1)
    assert dist.num_classes == 7


@pytest.mark.parametrize("name", ["ways", "shots", "queries"])
@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_non_positive_counts(name, value):
    counts = {"ways": 2, "shots": 1, "queries": 1, name: value}
    with pytest.raises(ValueError, match=name):
        FewShotClassification(*image_set(), **counts)


def test_ways_more_than_classes():
    with pytest.raises(
        ValueError, match=r"ways must be at most the number of classes \(7\), got 8"
    ):
        FewShotClassification(*image_set(), 8, 1, 1)
    with pytest.raises(ValueError, match=r"ways .* \(7 before rotation\)"):
        FewShotClassification(*image_set(), 8, 1, 1, rotate_classes=True)


def test_class_with_too_few_images_is_named():
    images, labels = image_set()
    names = [f"class{c}" for c in range(7)]
    with pytest.raises(ValueError, match=r"shots \+ queries = 4 \+ 3 = 7 .* 'class0' .* has 6"):
        FewShotClassification(images, labels, 2, 4, 3, class_names=names)
    # A class with no image at all is named too.
    with pytest.raises(ValueError, match=r"'class7' \(label 7\) has 0"):
        FewShotClassification(images, labels, 2, 1, 1, class_names=names + ["class7"])


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(63, 1, 4, 4),
        torch.zeros(63, 4, 4, dtype=torch.uint8),
        torch.zeros(63, 1, 1, 4, 4, dtype=torch.uint8),
        [[0]],
    ],
)
def test_images_must_be_uint8_4d(images):
    _, labels = image_set()
    with pytest.raises(ValueError, match=r"images must be a uint8 Tensor of shape \[M, C, H, W\]"):
        FewShotClassification(images, labels, 2, 1, 1)


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(62, dtype=torch.int64), torch.zeros(63, 1, dtype=torch.int64), torch.zeros(63)],
)
def test_labels_must_match_the_images(labels):
    images, _ = image_set()
    with pytest.raises(
        ValueError, match=r"labels must be an integer Tensor of shape \[M\] = \[63\]"
    ):
        FewShotClassification(images, labels, 1, 1, 1)


def test_label_values():
    images, labels = image_set()
    with pytest.raises(ValueError, match="labels must be >= 0"):
        FewShotClassification(images, labels - 1, 2, 1, 1)
    with pytest.raises(
        ValueError, match=r"labels must lie in \[0, len\(class_names\)\) = \[0, 3\)"
    ):
        FewShotClassification(images, labels, 2, 1, 1, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one image"):
        FewShotClassification(images[:0], labels[:0], 1, 1, 1)


def test_rotations_need_square_images():
    images = torch.zeros(4, 1, 2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="rotate_classes needs square images"):
        FewShotClassification(images, torch.tensor([0, 0, 1, 1]), 2, 1, 1, rotate_classes=True)


def test_bad_num_tasks_and_generator():
    dist = FewShotClassification(*image_set(), 2, 1, 1)
    with pytest.raises(ValueError, match="num_tasks"):
        dist.sample(0, gen(0))
    with pytest.raises(TypeError, match="generator"):
        dist.sample(1, 123)  # type: ignore[arg-type]


def test_within_group_tasks_and_bad_groups():
    images, labels = image_set()  # 7 classes
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    dist = FewShotClassification(
        images, labels, 2, 1, 1, class_groups=groups, rotate_classes=True
    ).within_groups()
    classes = dist.sample_indices(100, gen(0)).classes % 7  # rotations are new classes
    assert all(len(set(groups[row].tolist())) == 1 for row in classes)
    assert set(groups[classes[:, 0]].tolist()) == {0, 1, 2}
    three = FewShotClassification(images, labels, 3, 1, 1, class_groups=groups).within_groups()
    assert set(groups[three.sample_indices(30, gen(0)).classes].flatten().tolist()) == {0}
    with pytest.raises(ValueError, match="within_groups\\(\\) needs class_groups"):
        FewShotClassification(images, labels, 2, 1, 1).within_groups()
    with pytest.raises(ValueError, match="class_groups must be an integer Tensor of shape \\[7\\]"):
        FewShotClassification(images, labels, 2, 1, 1, class_groups=groups.float())
    with pytest.raises(ValueError, match="one group >= 0 for each of the 7 classes"):
        FewShotClassification(images, labels, 2, 1, 1, class_groups=groups[:5])
    with pytest.raises(ValueError, match="at least ways=4 classes, but the largest has 3"):
        FewShotClassification(images, labels, 4, 1, 1, class_groups=groups).within_groups()
