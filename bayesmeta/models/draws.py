"""Random draws for tensors on any device from a generator on any device.

A ``torch.Generator`` lives on one device and can only fill tensors there. bayesmeta's seeds
are CPU generators (``fit``, ``evaluate``, the task samplers), and its tensors may be on a GPU,
so every draw is made on the generator's device and then moved: one seed gives the same
numbers on every device, as the task samplers of :mod:`bayesmeta.data` already do.
"""

from __future__ import annotations

import torch

__all__ = ["standard_normal", "categorical"]


def _device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return like.device if generator is None else generator.device


def standard_normal(
    shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal draws of ``shape`` with ``like``'s dtype and device.

    Drawn on ``generator``'s device (``like``'s own default generator when ``None``) with the
    same call as ``torch.distributions.Normal.rsample``, so a shared seed gives Pyro's draws.
    """
    out = torch.empty(shape, dtype=like.dtype, device=_device(generator, like))
    return out.normal_(generator=generator).to(like.device)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One class per row of ``probs [..., N]``: an int64 Tensor ``[...]`` on ``probs``' device."""
    flat = probs.reshape(-1, probs.shape[-1]).to(_device(generator, probs))
    draws = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return draws.to(probs.device)
