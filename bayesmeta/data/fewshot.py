"""N-way K-shot classification tasks over any class-indexed image set held in memory."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch

from bayesmeta.data._common import check_count, resolve_generator
from bayesmeta.data.tasks import TaskBatch

__all__ = ["FewShotClassification", "TaskIndices"]

_ROTATION_SUFFIXES = ("", "@rot90", "@rot180", "@rot270")


class TaskIndices(NamedTuple):
    """Which stored images and classes make up a batch of tasks.

    Attributes
    ----------
    support : Tensor of shape ``[T, N * K]``
        Indices into the stored images; entry ``n * K + k`` is shot ``k`` of the class labelled
        ``n``.
    query : Tensor of shape ``[T, N * Q]``
        Same layout with ``Q`` images per class.
    classes : Tensor of shape ``[T, N]``
        ``classes[t, n]`` is the class (of ``num_classes``) that task ``t`` labels ``n``.
    """

    support: torch.Tensor
    query: torch.Tensor
    classes: torch.Tensor


class FewShotClassification:
    """N-way K-shot tasks drawn from a class-indexed image set held in memory.

    Each task draws ``N = ways`` distinct classes, labels them with a fresh random permutation of
    ``0..N-1``, and draws ``K = shots`` support and ``Q = queries`` query images per class, without
    replacement, so no image is in both sets.

    Parameters
    ----------
    images : uint8 Tensor of shape ``[M, C, H, W]``
    labels : integer Tensor of shape ``[M]``
        Class of each image, in ``0..num_classes-1``.
    ways, shots, queries : int
        ``N``, ``K`` and ``Q``.
    class_names : sequence of str, optional
        One name per class (used in error messages); defaults to ``"0", "1", ...``.
    rotate_classes : bool
        Add the images turned by 90, 180 and 270 degrees as three new classes per class
        (Santoro et al. 2016); class ``r * C + c`` is class ``c`` turned ``r`` quarter turns
        counter-clockwise. As in Finn et al. (2017), a task draws ``N`` distinct unrotated classes
        and then one random turn for each, so a task never holds two turns of one class (which a
        symmetric character would make indistinguishable). Needs square images; rotated copies
        are made at sampling time, not stored.
    class_groups : integer Tensor of shape ``[num_classes]`` (before rotation), optional
        A group for each class, e.g. its alphabet (:meth:`within_groups`).

    Notes
    -----
    Support and query sets are class-major: entry ``n * K + k`` of ``support_x`` is shot ``k`` of
    the class labelled ``n``, so ``support_x.view(T, N, K, C, H, W)`` groups shots by label. Labels
    carry no information about the class, since classes are drawn in random order.

    Random numbers are drawn on the generator's device (CPU for ``torch.default_generator``, used
    when ``generator=None``), so a seed gives the same tasks on every device; images are gathered
    on the device of the stored images (see :meth:`to`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        class_names: Sequence[str] | None = None,
        rotate_classes: bool = False,
        class_groups: torch.Tensor | None = None,
    ) -> None:
        self.ways = check_count("ways", ways)
        self.shots = check_count("shots", shots)
        self.queries = check_count("queries", queries)
        _check_images_and_labels(images, labels)
        labels = labels.to(device=images.device, dtype=torch.int64)
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
        num_base = int(labels.max()) + 1 if class_names is None else len(class_names)
        if int(labels.max()) >= num_base:
            raise ValueError(
                f"labels must lie in [0, len(class_names)) = [0, {num_base}), "
                f"found {int(labels.max())}"
            )
        names = [str(c) for c in range(num_base)] if class_names is None else list(class_names)
        if rotate_classes and images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"rotate_classes needs square images, got H x W = {tuple(images.shape[-2:])}"
            )
        self.rotate_classes = bool(rotate_classes)
        self.image_shape: tuple[int, int, int] = tuple(images.shape[1:])  # type: ignore[assignment]
        self.class_names = (
            [n + s for s in _ROTATION_SUFFIXES for n in names] if rotate_classes else names
        )
        self.num_classes = len(self.class_names)
        self._num_base = num_base
        if self.ways > num_base:
            raise ValueError(
                f"ways must be at most the number of classes ({num_base}"
                f"{' before rotation' if rotate_classes else ''}), got {self.ways}"
            )

        self.within_group = False
        self._groups = _check_groups(class_groups, num_base)
        if self._groups is not None:
            self._groups = self._groups.to(images.device)

        self._images = images
        self._table, self._counts = self._index(labels, num_base, names)
        # Pixel permutations [4, H * W]: turn r of a flattened image is image[_rotations[r]].
        side = images.shape[-1]
        pixels = torch.arange(side * side).view(side, side)
        self._rotations = torch.stack([torch.rot90(pixels, r).flatten() for r in range(4)])
        # uint8 -> [0, 1] by table: CUDA divides by a scalar as a product with its reciprocal,
        # which rounds differently from the CPU's division; the table's floats are the CPU's.
        self._levels = torch.arange(256, dtype=torch.float32).div_(255.0).to(images.device)

    def _index(self, labels: torch.Tensor, num_base: int, names: list[str]):
        """Per-class index table ``[C, max_per_class]`` (padded with 0, masked by the counts
        ``[C]``, returned with it), so that a batch of tasks is drawn with a few vectorised
        tensor ops instead of a loop over tasks; every class must hold shots + queries."""
        counts = torch.bincount(labels, minlength=num_base)
        need = self.shots + self.queries
        if int(counts.min()) < need:
            c = int(counts.argmin())
            raise ValueError(
                f"every class needs shots + queries = {self.shots} + {self.queries} = {need} "
                f"images, but class {names[c]!r} (label {c}) has {int(counts[c])}"
            )
        order = torch.argsort(labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
        table = torch.zeros(num_base, int(counts.max()), dtype=torch.int64, device=labels.device)
        table[labels[order], position] = order
        return table, counts

    @property
    def num_images(self) -> int:
        """``M``, the number of stored images (rotated copies not counted)."""
        return self._images.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of the stored images, where tasks are assembled."""
        return self._images.device

    def to(self, device: torch.device | str) -> FewShotClassification:
        """Move the stored images to ``device`` (in place); returns ``self``."""
        self._images = self._images.to(device)
        self._table = self._table.to(device)
        self._counts = self._counts.to(device)
        self._rotations = self._rotations.to(device)
        self._levels = self._levels.to(device)
        if self._groups is not None:
            self._groups = self._groups.to(device)
        return self

    def with_ways(self, ways: int) -> FewShotClassification:
        """The same tasks with ``ways`` classes each, sharing the stored images (e.g. ``2N``
        ways, whose last ``N`` classes serve as out-of-episode queries of an ``N``-way task:
        :func:`bayesmeta.inference.evaluate_out_of_episode`)."""
        ways = check_count("ways", ways)
        if ways > self._num_base:
            raise ValueError(
                f"ways must be at most the number of classes ({self._num_base}"
                f"{' before rotation' if self.rotate_classes else ''}), got {ways}"
            )
        if self.within_group and int(torch.bincount(self._groups).max()) < ways:
            raise ValueError(f"ways={ways} within a group: no group has {ways} classes")
        other = copy.copy(self)
        other.ways = ways
        return other

    def within_groups(self) -> FewShotClassification:
        """The same tasks with all ``N`` classes of each drawn from one group (Lake et al.'s
        within-alphabet protocol; Omniglot's groups are its alphabets): the group is drawn
        uniformly among those with at least ``N`` classes, then its classes as usual. Shares
        the stored images. Needs ``class_groups``."""
        if self._groups is None:
            raise ValueError(
                f"within_groups() needs class_groups (a group per class), but this "
                f"{type(self).__name__} has none (Omniglot: data without alphabets)"
            )
        largest = int(torch.bincount(self._groups).max())
        if largest < self.ways:
            raise ValueError(
                f"within_groups() needs a group with at least ways={self.ways} classes, but the "
                f"largest has {largest}"
            )
        other = copy.copy(self)
        other.within_group = True
        return other

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"num_classes={self.num_classes}, num_images={self.num_images}, "
            f"image_shape={self.image_shape})"
        )

    def sample_indices(
        self, num_tasks: int, generator: torch.Generator | None = None
    ) -> TaskIndices:
        """Draw the image and class indices of ``T`` tasks (what :meth:`sample` gathers).

        Parameters
        ----------
        num_tasks : int
            ``T``.
        generator : torch.Generator, optional
            ``None`` uses ``torch.default_generator``.

        Returns
        -------
        TaskIndices
            ``support [T, N * K]``, ``query [T, N * Q]`` and ``classes [T, N]``, on :attr:`device`.
        """
        T = check_count("num_tasks", num_tasks)
        g = resolve_generator(generator)
        N, K, Q = self.ways, self.shots, self.queries
        # Random keys then argsort: a uniformly random ordered subset for every row at once.
        keys = torch.rand(T, self._num_base, generator=g, device=g.device).to(self.device)
        if self.within_group:
            # One eligible group per task; classes of other groups get key 2 > any uniform key.
            eligible = torch.bincount(self._groups).ge(N).nonzero().flatten()
            pick = torch.randint(len(eligible), (T,), generator=g, device=g.device)
            group = eligible[pick.to(self.device)]
            keys = keys.masked_fill(self._groups.unsqueeze(0) != group.unsqueeze(1), 2.0)
        base = keys.argsort(dim=1)[:, :N]
        classes = base
        if self.rotate_classes:
            turns = torch.randint(0, 4, (T, N), generator=g, device=g.device)
            classes = base + self._num_base * turns.to(self.device)
        width = self._table.shape[1]
        keys = torch.rand(T, N, width, generator=g, device=g.device).to(self.device)
        # Slots past a class's count get key 2 > any uniform key, so they sort last.
        padding = torch.arange(width, device=self.device) >= self._counts[base].unsqueeze(-1)
        slots = keys.masked_fill(padding, 2.0).argsort(dim=-1)[..., : K + Q]
        index = self._table[base.unsqueeze(-1), slots]
        support = index[..., :K].reshape(T, N * K)
        query = index[..., K:].reshape(T, N * Q)
        return TaskIndices(support, query, classes)

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``T`` tasks.

        Parameters
        ----------
        num_tasks : int
            ``T``.
        generator : torch.Generator, optional
            Source of all randomness; ``None`` uses ``torch.default_generator`` (the global CPU
            generator, seeded by ``torch.manual_seed``).

        Returns
        -------
        TaskBatch
            float32 images in ``[0, 1]``: ``support_x [T, N * K, C, H, W]``,
            ``query_x [T, N * Q, C, H, W]``; int64 labels ``support_y [T, N * K]``,
            ``query_y [T, N * Q]``; ``num_classes = N``. Class-major order (see Notes).
        """
        indices = self.sample_indices(num_tasks, generator)
        turns = indices.classes // self._num_base
        return TaskBatch(
            self._gather(indices.support, turns, self.shots),
            self._labels(num_tasks, self.shots),
            self._gather(indices.query, turns, self.queries),
            self._labels(num_tasks, self.queries),
            num_classes=self.ways,
        )

    def _labels(self, num_tasks: int, per_class: int) -> torch.Tensor:
        labels = torch.arange(self.ways, device=self.device).repeat_interleave(per_class)
        return labels.repeat(num_tasks, 1)

    def _gather(self, index: torch.Tensor, turns: torch.Tensor, per_class: int) -> torch.Tensor:
        """Images ``[T, N * per_class, C, H, W]`` as float32 in [0, 1], rotated per class."""
        # index_select and gather: much faster than boolean-mask or advanced indexing on CPU.
        x = self._images.index_select(0, index.flatten())
        if self.rotate_classes:
            turns = turns.repeat_interleave(per_class, dim=1).flatten()
            pixels = self._rotations[turns].unsqueeze(1).expand(-1, x.shape[1], -1)
            x = x.flatten(2).gather(2, pixels)
        return self._levels[x.view(*index.shape, *self.image_shape).long()]


def _check_groups(groups: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """``class_groups`` as int64 ``[num_classes]``."""
    if groups is None:
        return None
    if not isinstance(groups, torch.Tensor) or groups.dtype.is_floating_point or groups.dim() != 1:
        raise ValueError(
            f"class_groups must be an integer Tensor of shape [{num_classes}], got "
            f"{_describe(groups)}"
        )
    if groups.shape[0] != num_classes or (groups.numel() and int(groups.min()) < 0):
        low = int(groups.min()) if groups.numel() else None
        raise ValueError(
            f"class_groups must hold one group >= 0 for each of the {num_classes} classes, got "
            f"shape {tuple(groups.shape)} with minimum {low}"
        )
    return groups.to(torch.int64)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"dtype {value.dtype}, shape {tuple(value.shape)}"
    return type(value).__name__


def _check_images_and_labels(images: object, labels: object) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 Tensor of shape [M, C, H, W], got {_describe(images)}"
        )
    integer = isinstance(labels, torch.Tensor) and not (
        labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex()
    )
    if not integer or labels.shape != images.shape[:1]:  # type: ignore[union-attr]
        raise ValueError(
            f"labels must be an integer Tensor of shape [M] = [{images.shape[0]}] "
            f"(one per image), got {_describe(labels)}"
        )
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got M=0")
