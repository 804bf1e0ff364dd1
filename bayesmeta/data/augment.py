"""Random affine distortions of the images of classification tasks (meta-training only).

Lake's small Omniglot sets give meta-training about 120 characters; MAML on them soon stops
improving on unseen alphabets and then gets worse while its confidence grows. Drawing every
training image with a small random shift, turn and zoom lets it train longer, to a more
accurate and better calibrated learner (docs/methods.md, "Measured choices behind the
defaults").
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from bayesmeta.data._common import resolve_generator
from bayesmeta.data.tasks import TaskBatch

__all__ = ["RandomAffine", "affine_images"]


def affine_images(
    x: torch.Tensor, shift: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Move, turn and zoom each image about its centre; what leaves the frame is lost and what
    enters it is 0 (Omniglot's background after loading: ink is 1).

    Parameters
    ----------
    x : Tensor ``[*lead, C, H, W]``
    shift : Tensor ``[*lead, 2]``
        Pixels right and down.
    angle : Tensor ``[*lead]``
        Degrees counter-clockwise.
    scale : Tensor ``[*lead]``
        Zoom factor (> 1 enlarges).

    Returns
    -------
    Tensor of the shape of ``x``: bilinear samples of the distorted images.
    """
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    a = angle.reshape(-1).to(x) * (math.pi / 180)
    inv = 1 / scale.reshape(-1).to(x)
    cos, sin = torch.cos(a) * inv, torch.sin(a) * inv
    # affine_grid maps output to input coordinates in [-1, 1]: the inverse of the distortion
    # (turn by -angle, divide by the zoom, then undo the shift); a pixel spans 2/W of them.
    s = shift.reshape(-1, 2).to(x)
    tx, ty = 2 * s[:, 0] / w, 2 * s[:, 1] / h
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, -(cos * tx - sin * ty * h / w)], -1),
            torch.stack([sin * w / h, cos, -(sin * tx * w / h + cos * ty)], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, c, h, w)


def _check_range(name: str, value: object, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be below {upper}, got {value!r}")
    return float(value)


class RandomAffine:
    """A task distribution whose images are those of ``tasks``, each distorted at random.

    Every support and query image gets its own shift, turn and zoom, drawn uniformly from
    ``[-max_shift, max_shift]`` pixels (per axis), ``[-max_rotation, max_rotation]`` degrees and
    ``[1 - max_scale, 1 + max_scale]``, from the generator that draws the tasks. Labels are
    unchanged. Use it for meta-training only: test tasks should show the images as they are.

    Parameters
    ----------
    tasks : a classification task distribution (``sample(T, generator) -> TaskBatch`` with
        images ``[T, S, C, H, W]``), e.g. :class:`~bayesmeta.data.Omniglot`
    max_shift : float, pixels
    max_rotation : float, degrees
    max_scale : float in [0, 1)
    """

    def __init__(
        self,
        tasks: object,
        max_shift: float = 2.0,
        max_rotation: float = 15.0,
        max_scale: float = 0.1,
    ) -> None:
        if not hasattr(tasks, "sample"):
            raise TypeError(f"tasks must have .sample(num_tasks, generator), got {type(tasks)}")
        self.tasks = tasks
        self.max_shift = _check_range("max_shift", max_shift)
        self.max_rotation = _check_range("max_rotation", max_rotation)
        self.max_scale = _check_range("max_scale", max_scale, upper=1.0)

    def __repr__(self) -> str:
        return (
            f"RandomAffine({self.tasks!r}, max_shift={self.max_shift:g}, "
            f"max_rotation={self.max_rotation:g}, max_scale={self.max_scale:g})"
        )

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Draw ``T`` tasks of ``tasks``, then distort every image (same shapes and labels)."""
        g = resolve_generator(generator)
        batch = self.tasks.sample(num_tasks, g)
        if batch.support_x.dim() != 5:
            raise ValueError(
                "RandomAffine needs image tasks, support_x [T, S, C, H, W]; got shape "
                f"{tuple(batch.support_x.shape)}"
            )
        return TaskBatch(
            self._distort(batch.support_x, g),
            batch.support_y,
            self._distort(batch.query_x, g),
            batch.query_y,
            num_classes=batch.num_classes,
        )

    def _distort(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        lead = x.shape[:-3]

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*lead, *shape, generator=g, device=g.device).mul_(2).sub_(1)

        shift = uniform(2) * self.max_shift
        angle = uniform() * self.max_rotation
        scale = 1 + uniform() * self.max_scale
        return affine_images(x, shift.to(x.device), angle.to(x.device), scale.to(x.device))
