"""Omniglot: the packaged small background zips, fake trees in every layout, and bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision

from bayesmeta.data import (
    ClassSplit,
    Omniglot,
    TaskDistribution,
    _omniglot_files,
    omniglot,
    omniglot_image,
    packaged_omniglot_root,
)
from tests.fakes import SIZE, fake_omniglot_download, png_bytes, write_tree


def gen(seed):
    return torch.Generator().manual_seed(seed)


# The packaged zips -------------------------------------------------------------------------------

ALPHABETS = {
    "Balinese": 24,
    "Early_Aramaic": 22,
    "Greek": 24,
    "Japanese_(katakana)": 47,
    "Korean": 40,
    "Latin": 26,
    "Sanskrit": 42,
    "Tagalog": 17,
}


def test_packaged_zips_hold_242_characters_of_20_drawings(omniglot_root):
    dist = Omniglot(omniglot_root, 5, 1, 19, split="all", rotations=False)
    assert isinstance(dist, TaskDistribution)
    assert dist.alphabets == sorted(ALPHABETS)
    assert dist.num_characters == dist.num_classes == 242 and dist.num_images == 4840
    assert torch.equal(dist._counts, torch.full((242,), 20))
    for alphabet, n in ALPHABETS.items():
        assert sum(c.startswith(alphabet + "/") for c in dist.characters) == n
    assert "Greek/character01" in dist.class_names
    batch = dist.sample(4, gen(0))
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 95, 1, 28, 28)
    # Strokes bright on a dark background, and the full range used.
    assert 0.02 < batch.query_x.mean() < 0.5
    assert batch.query_x.min() == 0 and batch.query_x.max() == 1


def test_packaged_zip_splits_are_disjoint_by_alphabet(omniglot_root):
    splits = {s: Omniglot(omniglot_root, 5, 1, 1, split=s) for s in ("train", "val", "test")}
    alphabets = {s: set(d.alphabets) for s, d in splits.items()}
    assert [len(alphabets[s]) for s in ("train", "val", "test")] == [5, 1, 2]
    assert set.union(*alphabets.values()) == set(ALPHABETS)
    assert sum(d.num_characters for d in splits.values()) == 242
    for s, d in splits.items():
        assert d.num_characters == sum(ALPHABETS[a] for a in alphabets[s])
        assert {c.split("/")[0] for c in d.characters} == alphabets[s]
    # Rotations on the train split only, and never of a character of another split.
    train, test = splits["train"], splits["test"]
    assert train.num_classes == 4 * train.num_characters
    assert splits["val"].num_classes == splits["val"].num_characters
    assert test.num_classes == test.num_characters
    unrotated = {n.split("@")[0] for n in train.class_names}
    assert unrotated == set(train.characters)
    assert not unrotated & (set(test.characters) | set(splits["val"].characters))
    rotated = Omniglot(omniglot_root, 5, 1, 1, split="test", rotations="all")
    assert rotated.num_classes == 4 * test.num_characters


def test_packaged_files_match_their_checksums_and_carry_their_license(omniglot_root):
    assert omniglot_root == packaged_omniglot_root()
    assert omniglot_root.parent == Path(_omniglot_files.__file__).parent  # inside the package
    names = ["images_background_small1.zip", "images_background_small2.zip"]
    assert sorted(p.name for p in omniglot_root.iterdir()) == ["LICENSE", "SHA256SUMS", *names]
    listed = dict(reversed(line.split()) for line in (omniglot_root / "SHA256SUMS").open())
    assert sorted(listed) == names
    for name, expected in listed.items():
        assert hashlib.sha256((omniglot_root / name).read_bytes()).hexdigest() == expected, name
        _omniglot_files.check_sha256(omniglot_root / name)
    license_text = (omniglot_root / "LICENSE").read_text()
    assert "MIT" in license_text and "Brenden Lake" in license_text


@pytest.mark.slow
@pytest.mark.integration
def test_no_root_reads_the_packaged_sets_with_nothing_outside_the_package(tmp_path):
    # A fresh process in an empty folder, with the old data variables pointing at an empty one:
    # the library reads neither, and Omniglot() alone builds tasks.
    empty = tmp_path / "empty"
    empty.mkdir()
    checkout = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "BAYESMETA_SHARED": str(empty), "BAYESMETA_DATA_ROOT": str(empty)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    code = (
        "import torch\n"
        "from bayesmeta.data import Omniglot\n"
        "d = Omniglot(split='test')\n"
        "b = d.sample(2, torch.Generator().manual_seed(0))\n"
        "print(d.root, d.ways, d.shots, d.queries, d.num_characters, *b.query_x.shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    root, *numbers = done.stdout.split()
    assert root == str(packaged_omniglot_root())
    assert numbers == "5 1 15 64 2 75 1 28 28".split()  # 5-way 1-shot, 15 queries: 75


def test_no_root_is_the_packaged_folder_and_cannot_be_downloaded_into(omniglot_root):
    dist = Omniglot(split="val", queries=1)
    assert dist.root == omniglot_root and (dist.ways, dist.shots) == (5, 1)
    assert dist.characters == Omniglot(omniglot_root, 5, 1, 1, split="val").characters
    with pytest.raises(ValueError, match="download=True needs a root"):
        Omniglot(download=True)


def test_a_packaged_file_gone_missing_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "_PACKAGED", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"images_background_small1\.zip is missing"):
        Omniglot(split="val")


def test_split_seed_and_fractions(omniglot_root):
    partitions = {
        s: tuple(Omniglot(omniglot_root, 1, 1, 1, split=ClassSplit("test", seed=s)).alphabets)
        for s in range(4)
    }
    assert len(set(partitions.values())) > 1
    again = Omniglot(omniglot_root, 1, 1, 1, split=ClassSplit("test", seed=2))
    assert tuple(again.alphabets) == partitions[2]
    halves = [
        Omniglot(omniglot_root, 1, 1, 1, split=ClassSplit(s, fractions=(0.5, 0.25, 0.25)))
        for s in ("train", "val", "test")
    ]
    assert [len(d.alphabets) for d in halves] == [4, 2, 2]
    with pytest.raises(ValueError, match="split 'val' would be empty"):
        Omniglot(omniglot_root, 1, 1, 1, split=ClassSplit("val", fractions=(0.95, 0.0, 0.05)))


def test_split_by_character(omniglot_root):
    splits = [
        Omniglot(omniglot_root, 5, 1, 1, split=ClassSplit(s, by="character"), rotations=False)
        for s in ("train", "val", "test")
    ]
    # 242 x (0.6, 0.15, 0.25) = (145.2, 36.3, 60.5): the spare character goes to test.
    assert [d.num_characters for d in splits] == [145, 36, 61]
    names = [set(d.characters) for d in splits]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    exact = Omniglot(omniglot_root, 5, 1, 1, ClassSplit(by="character", fractions=(200, 20, 22)))
    assert exact.num_characters == 200
    with pytest.raises(ValueError, match=r"counts must sum to the number of characters \(242\)"):
        Omniglot(omniglot_root, 5, 1, 1, ClassSplit(by="character", fractions=(200, 20, 20)))


def test_seeded_sampling(omniglot_root):
    dist = Omniglot(omniglot_root, 5, 1, 2, split="train")
    a, b, c = dist.sample(3, gen(1)), dist.sample(3, gen(1)), dist.sample(3, gen(2))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x)


def test_image_size(omniglot_root):
    dist = Omniglot(omniglot_root, 5, 1, 1, split="val", image_size=14)
    assert dist.image_shape == (1, 14, 14)
    assert dist.sample(1, gen(0)).support_x.shape == (1, 5, 1, 14, 14)


# Fake trees in every layout --------------------------------------------------------------------


def test_alphabet_tree(tmp_path):
    write_tree(tmp_path, {"Alpha": 2, "Beta": 3, "Gamma": 1})
    dist = Omniglot(tmp_path, 2, 1, 3, split="all", rotations=False, image_size=SIZE)
    assert dist.alphabets == ["Alpha", "Beta", "Gamma"]
    assert dist.characters[:3] == ["Alpha/character00", "Alpha/character01", "Beta/character00"]
    assert dist.num_classes == 6 and dist.num_images == 24
    # Exact inversion without resizing: white is 0, the 3 black pixels of each drawing are 255.
    assert set(dist._images.unique().tolist()) == {0, 255}
    assert torch.equal((dist._images == 255).sum((1, 2, 3)), torch.full((24,), 3))
    train = Omniglot(tmp_path, 1, 1, 1, ClassSplit(fractions=(1, 1, 1)), image_size=SIZE)
    assert len(train.alphabets) == 1 and train.num_classes == 4 * train.num_characters


def test_class_tree_splits_by_character(tmp_path):
    write_tree(tmp_path, None, classes=10)
    splits = [
        Omniglot(tmp_path, 1, 1, 1, split=s, image_size=SIZE) for s in ("train", "val", "test")
    ]
    assert all(d.alphabets == [] and d.split_by == "character" for d in splits)
    assert [d.num_characters for d in splits] == [6, 2, 2]
    assert splits[0].num_classes == 24 and splits[2].num_classes == 2
    assert set.union(*(set(d.characters) for d in splits)) == {f"class{j:02d}" for j in range(10)}
    with pytest.raises(ValueError, match="split by='alphabet' needs"):
        Omniglot(tmp_path, 1, 1, 1, ClassSplit(by="alphabet"), image_size=SIZE)


def test_torchvision_layout_merges_both_halves(tmp_path):
    write_tree(tmp_path / "omniglot-py" / "images_background", {"Alpha": 2, "Beta": 1})
    write_tree(tmp_path / "omniglot-py" / "images_evaluation", {"Gamma": 3})
    (tmp_path / "omniglot-py" / "images_background.zip").write_bytes(b"ignored: folders win")
    dist = Omniglot(tmp_path, 2, 1, 1, split="all", image_size=SIZE)
    assert dist.alphabets == ["Alpha", "Beta", "Gamma"] and dist.num_characters == 6
    # Lake's repository unzipped (no omniglot-py folder) reads the same.
    lake = Omniglot(tmp_path / "omniglot-py", 2, 1, 1, split="all", image_size=SIZE)
    assert lake.characters == dist.characters


def test_download_calls_torchvision_for_both_halves(tmp_path, monkeypatch):
    calls = fake_omniglot_download(monkeypatch, {"Back": 2}, {"Eval": 2})
    root = tmp_path / "new"
    dist = Omniglot(root, 2, 1, 1, split="all", download=True, image_size=SIZE)
    assert calls == [(root, True, True), (root, False, True)]
    assert dist.alphabets == ["Back", "Eval"] and dist.num_characters == 4


def test_download_leaves_a_half_unpacked_by_hand_and_names_the_half_it_cannot_fetch(
    tmp_path, monkeypatch
):
    calls = []

    class OfflineOmniglot:
        def __init__(self, root, background=True, download=False, **kwargs):
            calls.append(background)
            raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", OfflineOmniglot)
    write_tree(tmp_path / "omniglot-py" / "images_background", {"Back": 2})
    with pytest.raises(OSError, match=r"cannot download Omniglot's images_evaluation into .*"):
        Omniglot.download(tmp_path)
    assert calls == [False]  # the background half was there, without its zip: not fetched
    write_tree(tmp_path / "omniglot-py" / "images_evaluation", {"Eval": 2})
    Omniglot.download(tmp_path)  # both halves there: nothing to fetch, offline or not
    assert calls == [False]


def test_zips_are_read_in_place_and_deduplicated(tmp_path):
    def write_zip(name, characters):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as archive:
            archive.writestr(f"{name}/", b"")
            for i, character in enumerate(characters):
                for k in range(3):
                    archive.writestr(f"{name}/{character}/{k}.png", png_bytes(i * 3 + k))

    write_zip("images_background_small1", ["Alpha/c1", "Alpha/c2", "Shared/c1"])
    write_zip("images_background_small2", ["Beta/c1", "Shared/c1"])
    (tmp_path / "LICENSE").write_text("not an image")
    dist = Omniglot(tmp_path, 2, 1, 2, split="all", image_size=SIZE)
    assert dist.characters == ["Alpha/c1", "Alpha/c2", "Beta/c1", "Shared/c1"]
    assert dist.num_images == 12
    assert not any(tmp_path.glob("images_background_small1/*")), "zips must not be extracted"


def test_the_cache_notices_changed_files(tmp_path, monkeypatch):
    # A private cache, so that clearing it keeps the shared zips decoded for the other tests.
    monkeypatch.setattr(_omniglot_files, "_CACHE", {})
    write_tree(tmp_path, {"Alpha": 2})
    first = Omniglot(tmp_path, 2, 1, 1, split="all", image_size=SIZE)
    again = Omniglot(tmp_path, 2, 1, 1, split="all", image_size=SIZE)
    assert torch.equal(first._images, again._images)
    path = tmp_path / "Alpha" / "character00" / "0000_00.png"
    path.write_bytes(png_bytes(5))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = Omniglot(tmp_path, 2, 1, 1, split="all", image_size=SIZE)
    assert not torch.equal(first._images, changed._images)
    assert len(_omniglot_files._CACHE) == 2
    Omniglot.clear_cache()
    assert not _omniglot_files._CACHE
    assert torch.equal(changed._images, Omniglot(tmp_path, 2, 1, 1, "all", image_size=SIZE)._images)


# Bad input -------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match=r"root must be an existing folder.*not found"):
        Omniglot(tmp_path / "nowhere", 5, 1, 1)


def test_empty_root(tmp_path):
    with pytest.raises(ValueError, match=r"root .* is empty; looked for torchvision's folders"):
        Omniglot(tmp_path, 5, 1, 1)


def test_root_with_nothing_omniglot(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match=r"root .* holds none of these; looked for .*\.zip"):
        Omniglot(tmp_path, 5, 1, 1)


def test_mixed_tree(tmp_path):
    write_tree(tmp_path, None, classes=2)
    write_tree(tmp_path / "Alphabet", None, classes=1)
    with pytest.raises(ValueError, match="root .* mixes class folders"):
        Omniglot(tmp_path, 1, 1, 1, image_size=SIZE)


def test_unreadable_image_is_named(tmp_path):
    write_tree(tmp_path, {"Alpha": 2})
    (tmp_path / "Alpha" / "character01" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*character01/broken\.png"):
        Omniglot(tmp_path, 2, 1, 1, split="all", image_size=SIZE)


def test_a_zip_that_does_not_match_its_sha256sums_line_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(_omniglot_files, "_CACHE", {})
    path = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for k in range(2):
            archive.writestr(f"images_background_small1/Alpha/c1/{k}.png", png_bytes(k))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  images_background_small2.zip\n")  # not listed: not checked
    assert Omniglot(tmp_path, 1, 1, 1, split="all", image_size=SIZE).num_images == 2
    _omniglot_files.clear_cache()
    sums.write_text(f"{digest}  images_background_small1.zip\n")
    assert Omniglot(tmp_path, 1, 1, 1, split="all", image_size=SIZE).num_images == 2
    _omniglot_files.clear_cache()
    sums.write_text(f"{'0' * 64} *images_background_small1.zip\n")
    with pytest.raises(
        ValueError,
        match=r"images_background_small1\.zip' does not match its SHA256 in .*SHA256SUMS.*"
        rf"expected 0{{64}}, found {digest}\): the file is damaged",
    ):
        Omniglot(tmp_path, 1, 1, 1, split="all", image_size=SIZE)


def test_bad_zip_is_named(tmp_path):
    (tmp_path / "images_background_small1.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read zip .*images_background_small1\.zip"):
        Omniglot(tmp_path, 2, 1, 1)


def test_ways_more_than_characters(omniglot_root):
    with pytest.raises(ValueError, match=r"ways must be at most the number of classes \(26\)"):
        Omniglot(omniglot_root, 27, 1, 1, split="val")


def test_too_few_drawings_names_the_character(omniglot_root):
    with pytest.raises(ValueError, match=r"shots \+ queries = 15 \+ 6 = 21 .* has 20"):
        Omniglot(omniglot_root, 5, 15, 6, split="val")


@pytest.mark.parametrize("name", ["ways", "shots", "queries", "image_size"])
def test_non_positive_counts(omniglot_root, name):
    kwargs = {"ways": 5, "shots": 1, "queries": 1, name: 0}
    with pytest.raises(ValueError, match=name):
        Omniglot(omniglot_root, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "validation"}, "split must be one of"),
        ({"rotations": "train"}, "rotations must be True, False or 'all'"),
    ],
)
def test_bad_options(omniglot_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Omniglot(omniglot_root, 5, 1, 1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"part": "validation"}, "split must be one of"),
        ({"by": "drawer"}, "split by must be"),
        ({"seed": 1.5}, "split seed must be an int"),
        ({"fractions": (0.5, 0.5)}, "split fractions must be three numbers"),
        ({"fractions": (0.5, 0.2, 0.2)}, "split fractions must sum to 1"),
    ],
)
def test_bad_class_splits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassSplit(**kwargs)


def test_a_split_is_a_part_name_or_a_class_split(omniglot_root):
    with pytest.raises(TypeError, match="split must be a part's name or a ClassSplit, got dict"):
        Omniglot(omniglot_root, 5, 1, 1, split={"part": "test"})
    named = Omniglot(omniglot_root, 5, 1, 1, split="test")
    assert named.class_split == ClassSplit("test") and named.split == "test"
    assert named.alphabets == Omniglot(omniglot_root, 5, 1, 1, ClassSplit("test")).alphabets


# Within-alphabet tasks and the public image reader ----------------------------------------------


def test_within_alphabet_tasks_draw_every_class_from_one_alphabet(omniglot_root):
    # The test split: Early_Aramaic (22 characters) and Sanskrit (42), both enough for 20 ways.
    dist = Omniglot(omniglot_root, 20, 1, 2, split="test").within_groups()
    classes = dist.sample_indices(200, gen(0)).classes
    alphabet = [{dist.characters[c].split("/")[0] for c in row.tolist()} for row in classes]
    assert all(len(a) == 1 for a in alphabet)
    assert all(len(set(row.tolist())) == 20 for row in classes)
    picks = [next(iter(a)) for a in alphabet]
    # Each alphabet is drawn about half the time (uniform over alphabets, not characters).
    assert 70 < picks.count("Sanskrit") < 130, picks.count("Sanskrit")
    mixed = Omniglot(omniglot_root, 20, 1, 2, split="test").sample_indices(50, gen(0)).classes
    assert any(len({dist.characters[c].split("/")[0] for c in r.tolist()}) > 1 for r in mixed)
    # Off, the draws are those of earlier versions: the option adds draws only when on.
    assert torch.equal(
        Omniglot(omniglot_root, 5, 1, 2, split="test").sample_indices(3, gen(4)).classes,
        Omniglot(omniglot_root, 5, 1, 2, split="test").sample_indices(3, gen(4)).classes,
    )


def test_within_alphabet_skips_small_alphabets_and_refuses_what_cannot_work(tmp_path):
    write_tree(tmp_path / "a", {"Big": 4, "Small": 2})
    dist = Omniglot(tmp_path / "a", 3, 1, 1, split="all", image_size=SIZE).within_groups()
    classes = dist.sample_indices(20, gen(0)).classes
    assert all(dist.characters[c].startswith("Big/") for c in classes.flatten().tolist())
    with pytest.raises(ValueError, match="needs a group with at least ways=5 classes"):
        Omniglot(tmp_path / "a", 5, 1, 1, split="all", image_size=SIZE).within_groups()
    write_tree(tmp_path / "b", None, classes=4)
    with pytest.raises(ValueError, match="within_groups\\(\\) needs class_groups"):
        Omniglot(tmp_path / "b", 2, 1, 1, split="all", image_size=SIZE).within_groups()


def test_omniglot_image_reads_a_drawing_exactly_as_the_tasks_hold_it(omniglot_root, tmp_path):
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as archive:
        name = next(n for n in sorted(archive.namelist()) if n.endswith(".png"))
        data = archive.read(name)
    alphabet, character = name.split("/")[-3:-1]
    folder = tmp_path / alphabet / character
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(data)
    (folder / "b.png").write_bytes(data)
    dist = Omniglot(tmp_path, 1, 1, 1, split="all", rotations=False, image_size=20)
    stored = dist.sample(1, gen(0)).support_x[0, 0]
    for source in (data, folder / "a.png", str(folder / "a.png"), (folder / "a.png").open("rb")):
        image = omniglot_image(source, image_size=20)
        assert image.dtype == torch.float32 and image.shape == (1, 20, 20)
        torch.testing.assert_close(image, stored, rtol=0, atol=0)
    # Strokes are bright on a dark background.
    assert image.mean() < 0.5 and image.max() == 1.0
    with pytest.raises(ValueError, match="image_size"):
        omniglot_image(data, image_size=0)
    with pytest.raises(ValueError, match="cannot read image"):
        omniglot_image(b"not a png")
