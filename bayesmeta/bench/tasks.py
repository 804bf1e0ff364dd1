"""The task distributions of a benchmark family: meta-training, the test and its shifted twin.

Every family is tested twice so that the table shows a generalisation gap:

* sinusoid: amplitudes inside the meta-training range (0.1, 5.0), and outside it (5.0, 7.5);
* Omniglot: unseen alphabets (the test split, the headline number), and held-out characters of
  the meta-training alphabets ("seen alphabets"): a share of the train alphabets' characters is
  kept out of meta-training for it;
* an image folder: unseen classes (the test split) and the meta-training classes themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bayesmeta.bench.config import SINUSOID_OOD_AMPLITUDE, SINUSOID_TRAIN_AMPLITUDE, Family
from bayesmeta.data import (
    FewShotClassification,
    ImageFolderTasks,
    Omniglot,
    RandomAffine,
    Sinusoid,
)
from bayesmeta.runs import RUN_TASKS, RunTask, resolve_data_root

__all__ = [
    "Condition",
    "FamilyTasks",
    "FamilySpec",
    "FAMILY_SPECS",
    "family_spec",
    "family_tasks",
    "reads_data_root",
    "IMAGE_SIZE",
]

#: Side of the images of an image-folder family (miniImageNet's 84).
IMAGE_SIZE = 84
#: Seed of the held-out character draw (fixed, like the alphabet split's seed).
HELD_OUT_SEED = 0


@dataclass(frozen=True)
class Condition:
    """One test condition: a task distribution and what it is, in words."""

    tasks: object
    description: str


@dataclass(frozen=True)
class FamilyTasks:
    """Meta-training tasks and the test conditions of one family.

    ``conditions`` maps a condition's name to it; ``headline`` names the condition whose
    numbers are the family's main result; the gap is ``reference`` against ``shifted``.
    """

    train: object
    conditions: dict[str, Condition]
    headline: str
    reference: str
    shifted: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """What a family's ``task`` names, so that a suite asks it instead of branching on the name.

    Attributes
    ----------
    run_task : the registered :class:`~bayesmeta.runs.RunTask` its rows train as
    build : ``(family, root, noise=, held_out_fraction=, image_size=)`` → its
        :class:`FamilyTasks`
    folder : the folder it reads, ``"data_root"`` or ``"image_folder"`` (``None``: none)
    settings : run settings over the run task's defaults (an image folder's size, channels)
    speed : the task shape the speed grid times by default, if it is timed
    speed_tasks : ``(family, data_root)`` → the tasks the speed grid draws a batch from
    """

    run_task: str
    build: Callable[..., FamilyTasks]
    folder: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    speed: Family | None = None
    speed_tasks: Callable[[Family, str | None], Any] | None = None

    @property
    def run(self) -> RunTask:
        return RUN_TASKS[self.run_task]


def family_tasks(
    family: Family,
    *,
    noise: float = 0.3,
    data_root: str | Path | None = None,
    held_out_fraction: float = 0.2,
    image_size: int = 28,
    augment: bool = False,
) -> FamilyTasks:
    """The task distributions of ``family`` (``data_root``: the Omniglot or image folder);
    with ``augment`` the meta-training images are distorted at random
    (:class:`~bayesmeta.data.RandomAffine`), the test images never are."""
    spec = family_spec(family.task)
    if spec.folder is None:
        return spec.build(family, None, noise=noise)
    if data_root is None:
        raise ValueError(f"family {family.name!r} needs a data_root, got None")
    tasks = spec.build(
        family, Path(data_root), held_out_fraction=held_out_fraction, image_size=image_size
    )
    return replace(tasks, train=RandomAffine(tasks.train)) if augment else tasks


def reads_data_root(families: Iterable[Family]) -> bool:
    """Whether any of ``families`` reads the ``data_root`` folder (Omniglot)."""
    return any(family_spec(f.task).folder == "data_root" for f in families)


def family_spec(task: str) -> FamilySpec:
    """The spec of a family's ``task``, else ``ValueError`` naming the known ones."""
    if task not in FAMILY_SPECS:
        raise ValueError(f"family task must be one of {tuple(FAMILY_SPECS)}, got {task!r}")
    return FAMILY_SPECS[task]


def _sinusoid(family: Family, root: None, *, noise: float) -> FamilyTasks:
    def tasks(amplitude: tuple[float, float]) -> Sinusoid:
        return Sinusoid(family.shots, family.queries, amplitude=amplitude, noise=noise)

    (lo, hi), (olo, ohi) = SINUSOID_TRAIN_AMPLITUDE, SINUSOID_OOD_AMPLITUDE
    return FamilyTasks(
        train=tasks(SINUSOID_TRAIN_AMPLITUDE),
        conditions={
            "in_range": Condition(
                tasks(SINUSOID_TRAIN_AMPLITUDE), f"amplitude in [{lo}, {hi}] (meta-training range)"
            ),
            "out_of_range": Condition(
                tasks(SINUSOID_OOD_AMPLITUDE), f"amplitude in [{olo}, {ohi}] (never meta-trained)"
            ),
        },
        headline="in_range",
        reference="in_range",
        shifted="out_of_range",
    )


def _all_images(tasks: Omniglot) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every image of ``tasks`` (``uint8 [M, 1, H, W]``) and its character ``[M]``, by drawing
    one task over all characters with all drawings; ``None`` if characters differ in size."""
    per, rest = divmod(tasks.num_images, tasks.num_characters)
    if rest or per < 2:
        return None
    everything = Omniglot(
        tasks.root,
        tasks.num_characters,
        1,
        per - 1,
        split=tasks.split,
        rotations=False,
        image_size=tasks.image_shape[-1],
    ).sample(1, torch.Generator().manual_seed(HELD_OUT_SEED))
    x = torch.cat([everything.support_x[0], everything.query_x[0]])
    y = torch.cat([everything.support_y[0], everything.query_y[0]])
    return x.mul(255.0).round_().to(torch.uint8), y


def _omniglot(
    family: Family, root: Path, *, held_out_fraction: float, image_size: int
) -> FamilyTasks:
    N, K, Q = family.ways, family.shots, family.queries
    pool = Omniglot(root, N, K, Q, split="train", image_size=image_size)
    unseen = Omniglot(root, N, K, Q, split="test", image_size=image_size)
    alphabets = f"{len(unseen.alphabets)} alphabets never meta-trained (test split)"
    conditions = {"unseen_alphabets": Condition(unseen, alphabets)}
    notes: tuple[str, ...] = ()
    if family.within_alphabet:
        try:
            within = unseen.within_groups()
        except ValueError:
            notes = (f"no within-alphabet test: no unseen alphabet has {N} characters",)
        else:
            conditions["unseen_within_alphabet"] = Condition(
                within, f"all {N} characters of a task from one unseen alphabet (Lake et al.)"
            )
    everything = _all_images(pool)
    num_held = round(held_out_fraction * pool.num_characters)
    if everything is None or num_held < N or pool.num_characters - num_held < N:
        conditions["seen_alphabets"] = Condition(
            Omniglot(root, N, K, Q, split="train", rotations=False, image_size=image_size),
            "meta-training characters themselves (no held-out characters possible here)",
        )
        return FamilyTasks(
            pool, conditions, "unseen_alphabets", "seen_alphabets", "unseen_alphabets", notes
        )
    images, chars = everything
    order = torch.randperm(
        pool.num_characters, generator=torch.Generator().manual_seed(HELD_OUT_SEED)
    )
    held = order[:num_held]

    def subset(characters: torch.Tensor, rotate: bool) -> FewShotClassification:
        keep = torch.isin(chars, characters)
        relabel = torch.full((pool.num_characters,), -1, dtype=torch.int64)
        relabel[characters] = torch.arange(len(characters))
        return FewShotClassification(
            images[keep], relabel[chars[keep]], N, K, Q, rotate_classes=rotate
        )

    conditions["seen_alphabets"] = Condition(
        subset(held, rotate=False),
        f"{num_held} held-out characters of the {len(pool.alphabets)} meta-training alphabets",
    )
    return FamilyTasks(
        train=subset(order[num_held:], rotate=True),
        conditions=conditions,
        headline="unseen_alphabets",
        reference="seen_alphabets",
        shifted="unseen_alphabets",
        notes=(
            f"meta-trained on {pool.num_characters - num_held} characters (x4 rotations) of "
            f"{len(pool.alphabets)} alphabets; {num_held} of their characters held out",
            *notes,
        ),
    )


def _image_folder(family: Family, root: Path, **_: Any) -> FamilyTasks:
    N, K, Q = family.ways, family.shots, family.queries

    def tasks(split: str) -> ImageFolderTasks:
        return ImageFolderTasks(root, N, K, Q, split=split, image_size=IMAGE_SIZE)

    train = tasks("train")
    return FamilyTasks(
        train=train,
        conditions={
            "unseen_classes": Condition(tasks("test"), "classes never meta-trained (test split)"),
            "seen_classes": Condition(train, "the meta-training classes and images themselves"),
        },
        headline="unseen_classes",
        reference="seen_classes",
        shifted="unseen_classes",
    )


def _sinusoid_speed(family: Family, data_root: str | None) -> Sinusoid:
    return Sinusoid(family.shots, family.queries, noise=0.3)


def _omniglot_speed(family: Family, data_root: str | None) -> Omniglot:
    root = resolve_data_root(data_root)
    return Omniglot(root, family.ways, family.shots, family.queries, split="train")


#: The families' tasks by name: Finn et al.'s sinusoids, Omniglot, and a class-per-folder image
#: set (``--image-folder``) trained as Omniglot is, at :data:`IMAGE_SIZE` in colour.
FAMILY_SPECS: dict[str, FamilySpec] = {
    "sinusoid": FamilySpec(
        "sinusoid",
        _sinusoid,
        speed=Family("sinusoid", "sinusoid", 10, 10),
        speed_tasks=_sinusoid_speed,
    ),
    "omniglot": FamilySpec(
        "omniglot",
        _omniglot,
        folder="data_root",
        speed=Family("omniglot", "omniglot", 1, 15, ways=5),
        speed_tasks=_omniglot_speed,
    ),
    "images": FamilySpec(
        "omniglot",
        _image_folder,
        folder="image_folder",
        settings={"image_size": IMAGE_SIZE, "in_channels": 3},
    ),
}
