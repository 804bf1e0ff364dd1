"""Class-per-folder image sets: loading, splits and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bayesmeta.data import (
    ClassSplit,
    ImageFolderTasks,
    TaskDistribution,
    folder_image,
    load_image_folder,
)
from tests.fakes import colour, write_folder


def test_load_rgb_without_resizing(tmp_path):
    write_folder(tmp_path, 3)
    (tmp_path / "cls00" / "notes.txt").write_text("not an image")
    (tmp_path / "no_images").mkdir()
    images, labels, names = load_image_folder(tmp_path, image_size=(5, 6))
    assert names == ["cls00", "cls01", "cls02"]
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 5, 6)
    assert torch.equal(labels, torch.arange(3).repeat_interleave(4))
    for i, (label, k) in enumerate((j, k) for j in range(3) for k in range(4)):
        assert images[i, :, 0, 0].tolist() == list(colour(label, k))


def test_load_grayscale_resized_and_a_subset(tmp_path):
    write_folder(tmp_path, 3, ext="jpg")
    images, labels, names = load_image_folder(tmp_path, 7, grayscale=True, classes=["cls02"])
    assert images.shape == (4, 1, 7, 7) and names == ["cls02"] and labels.tolist() == [0] * 4
    expected = np.asarray(Image.new("RGB", (1, 1), colour(2, 0)).convert("L"))[0, 0]
    assert abs(int(images[0, 0, 3, 3]) - int(expected)) <= 2  # JPEG is lossy
    with pytest.raises(ValueError, match=r"classes not found .*\['cls09'\]"):
        load_image_folder(tmp_path, 7, classes=["cls02", "cls09"])


def test_random_class_splits(tmp_path):
    write_folder(tmp_path, 10)
    splits = [
        ImageFolderTasks(tmp_path, 1, 1, 1, split=s, image_size=4) for s in ("train", "val", "test")
    ]
    assert isinstance(splits[0], TaskDistribution)
    # 10 x (0.64, 0.16, 0.2) = (6.4, 1.6, 2.0): the spare class goes to val.
    assert [d.num_classes for d in splits] == [6, 2, 2]
    names = [set(d.class_names) for d in splits]
    assert set.union(*names) == {f"cls{j:02d}" for j in range(10)}
    assert sum(len(n) for n in names) == 10
    tests = [
        tuple(
            ImageFolderTasks(
                tmp_path, 1, 1, 1, ClassSplit("test", seed=s), image_size=4
            ).class_names
        )
        for s in range(4)
    ]
    assert tests[0] == tuple(splits[2].class_names) and len(set(tests)) > 1
    every = ImageFolderTasks(tmp_path, 5, 2, 2, split="all", image_size=4)
    batch = every.sample(3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 10, 3, 4, 4) and batch.num_classes == 5


def test_given_split_folders(tmp_path):
    for split, classes in (("train", 3), ("val", 2), ("test", 2)):
        write_folder(tmp_path / split, classes)
    train = ImageFolderTasks(tmp_path, 2, 1, 1, split="train", image_size=4)
    assert train.class_names == ["cls00", "cls01", "cls02"]
    every = ImageFolderTasks(tmp_path, 2, 1, 1, split="all", image_size=4)
    assert every.num_classes == 7 and every.class_names[0] == "test/cls00"
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(ValueError, match="split 'val' has no folder"):
        ImageFolderTasks(tmp_path, 2, 1, 1, split="val", image_size=4)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="root must be an existing folder"):
        ImageFolderTasks(tmp_path / "nowhere", 2, 1, 1)
    with pytest.raises(ValueError, match="root .* holds no <class>/<image> folders"):
        ImageFolderTasks(tmp_path, 2, 1, 1)
    write_folder(tmp_path, 4)
    (tmp_path / "cls01" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"cannot read image .*cls01/broken\.jpg"):
        load_image_folder(tmp_path, 4)
    (tmp_path / "cls01" / "broken.jpg").unlink()
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path, 0)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderTasks(tmp_path, 2, 1, 1, image_size=(4, -4))
    with pytest.raises(ValueError, match="ways"):
        ImageFolderTasks(tmp_path, 0, 1, 1)
    with pytest.raises(ValueError, match=r"ways must be at most the number of classes \(4\)"):
        ImageFolderTasks(tmp_path, 5, 1, 1, split="all", image_size=4)
    with pytest.raises(ValueError, match=r"shots \+ queries = 3 \+ 2 = 5 .* 'cls00'"):
        ImageFolderTasks(tmp_path, 2, 3, 2, split="all", image_size=4)
    with pytest.raises(ValueError, match="split must be one of"):
        ImageFolderTasks(tmp_path, 2, 1, 1, split="dev")


def test_folder_image_reads_an_image_as_the_folder_loader_does(tmp_path):
    write_folder(tmp_path, 2, per_class=1, size=(9, 7))
    images, _, _ = load_image_folder(tmp_path, (4, 5))
    for grayscale in (False, True):
        images, _, _ = load_image_folder(tmp_path, (4, 5), grayscale=grayscale)
        one = folder_image(tmp_path / "cls01" / "0.png", (4, 5), grayscale=grayscale)
        assert one.dtype == torch.float32 and one.shape == (1 if grayscale else 3, 4, 5)
        torch.testing.assert_close(one, images[1].float() / 255, rtol=0, atol=0)
