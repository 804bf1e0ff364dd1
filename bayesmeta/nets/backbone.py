"""The protocol of a backbone with task-batched kernels of its own.

Any ``nn.Module`` runs in the batched loop through ``torch.func`` (``vmap`` of
``functional_call``). A :class:`Backbone` also says how to run many weight sets at once faster,
what its features and linear head are, how much memory its forward keeps, and how to rebuild
it from JSON; :mod:`bayesmeta.nets.functional` and the checkpoints ask it instead of testing
for concrete classes. ``MLP`` and ``Conv4`` are the two shipped; a ResNet-12 would be one more
subclass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bayesmeta.nets import _registry

__all__ = [
    "Backbone",
    "BACKBONES",
    "register_backbone",
    "own_kernels",
    "saved_backbone",
    "LINEAR_HEAD",
    "DEFAULT_PRIOR_SCALE",
    "relative_scales",
    "has_local_kernel",
    "local_linear",
]

#: The names of a backbone's linear head (``head.weight [O, F]``, ``head.bias [O]``), whose
#: input :meth:`Backbone.batched` computes with ``features=True``.
LINEAR_HEAD = ("head.weight", "head.bias")

#: The prior σ of every weight of a network that declares no other
#: (:meth:`Backbone.default_prior_scale`).
DEFAULT_PRIOR_SCALE = 0.1

#: The backbones a checkpoint names by class (``{"type": name, **spec()}``):
#: :func:`register_backbone` adds one; another module is rebuilt from the model given at load.
BACKBONES: dict[str, type[Backbone]] = {}


class Backbone(nn.Module):
    """A network with hand-written task-batched kernels and a linear head on features.

    A subclass defines :attr:`input_shape`, :meth:`batched`, :meth:`activation_bytes` and
    :meth:`spec` (its constructor's arguments), and names its parameters so that the head is
    :data:`LINEAR_HEAD`. The kernels stand for the class's own ``forward``: a subclass that
    overrides ``forward`` runs through ``torch.func`` instead (:func:`own_kernels`).
    """

    #: Kernels a caller may ask :func:`~bayesmeta.nets.batched_forward` for by name, besides
    #: ``"auto"`` (:meth:`choose_kernel`) and ``"vmap"``.
    kernels: tuple[str, ...] = ()
    #: Off CUDA the kernels run one task after another, so a meta-step gains nothing from
    #: backpropagating many tasks at once (:func:`~bayesmeta.nets.preferred_task_chunk`).
    loops_tasks_off_cuda: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "batched" in cls.__dict__:
            cls._kernels_forward = cls.forward  # the forward that the kernels reproduce

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input example."""
        raise NotImplementedError

    def choose_kernel(self, device: torch.device, groups: int) -> str:
        """The kernel ``"auto"`` means for ``groups`` weight sets on ``device``."""
        raise NotImplementedError

    def batched(
        self,
        params: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        context: torch.Tensor | None,
        kernel: str,
        features: bool = False,
    ) -> torch.Tensor:
        """Outputs ``[G, B, *out]`` for weights ``[G, *shape]`` by name and inputs
        ``[G, B, *input_shape]`` (``context`` ``[G, S, *input_shape]``: the support inputs that
        normalisation takes its statistics from); with ``features``, the head's input
        ``[G, B, F]`` (the head's weights need not be given)."""
        raise NotImplementedError

    def batched_local(
        self,
        loc: Mapping[str, torch.Tensor],
        var: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        context: torch.Tensor | None,
        noise: Callable[[torch.Size], torch.Tensor],
    ) -> torch.Tensor:
        """Outputs ``[G, B, *out]`` under weights with independent Gaussian spreads, each
        input's pre-activations drawn from their distribution given the layer's input (the local
        reparameterisation trick, Kingma et al. 2015: in distribution, each input point draws
        its own weights). ``loc``: every weight ``[G, *shape]``; ``var``: the variances
        ``[G, *shape]`` of the weights that have a spread (the others are points); ``noise``:
        standard normal draws of a given shape, always asked for with the groups first
        (``[G, B, ...]``). Optional: a backbone without it runs the inner loop on weight draws
        (:func:`has_local_kernel`)."""
        raise NotImplementedError

    def supports_local(self) -> bool:
        """Whether this instance's :meth:`batched_local` applies (default: where the class
        defines it)."""
        return type(self).batched_local is not Backbone.batched_local

    def activation_bytes(self, points: int) -> int:
        """Estimated bytes that a forward of ``points`` inputs keeps for backward."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The constructor's arguments, as JSON values, that rebuild this architecture."""
        raise NotImplementedError

    def default_prior_scale(self) -> float | dict[str, float]:
        """The prior σ a model gives these weights unless told otherwise: one for all, or one
        per parameter name (default :data:`DEFAULT_PRIOR_SCALE`)."""
        return DEFAULT_PRIOR_SCALE


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: learners saved with a ``cls`` network record ``{"type": cls.__name__,
    **spec()}`` and rebuild it on load as ``cls(**spec())``, without being given the model."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone) and "batched" in dir(cls)):
        raise TypeError(f"register_backbone takes a Backbone subclass, got {cls!r}")
    return _registry.add(BACKBONES, cls.__name__, cls, "backbone")


def own_kernels(net: nn.Module) -> Backbone | None:
    """``net`` where its class's kernels compute its forward, else ``None`` (a module of a
    user's, or a backbone subclass with a ``forward`` of its own)."""
    if isinstance(net, Backbone) and type(net).forward is getattr(type(net), "_kernels_forward", 0):
        return net
    return None


def has_local_kernel(net: nn.Module) -> bool:
    """Whether ``net``'s own kernels include :meth:`Backbone.batched_local`."""
    own = own_kernels(net)
    return own is not None and own.supports_local()


def local_linear(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_var: torch.Tensor | None,
    bias_var: torch.Tensor | None,
    noise: Callable[[torch.Size], torch.Tensor],
) -> torch.Tensor:
    """A linear layer's pre-activations ``[G, B, O]`` drawn per point from
    ``Normal(h·Wᵀ + b, h²·Vᵀ + v)`` for inputs ``h`` ``[G, B, F]``, means ``weight`` ``[G, O, F]``,
    ``bias`` ``[G, O]`` and variances ``weight_var``, ``bias_var`` of the same shapes (``None``:
    a point): the building block of :meth:`Backbone.batched_local`."""
    mean = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
    if weight_var is None and bias_var is None:
        return mean
    if weight_var is None:
        variance = bias_var.unsqueeze(1)
    elif bias_var is None:
        variance = torch.bmm(h.square(), weight_var.transpose(1, 2))
    else:
        variance = torch.baddbmm(bias_var.unsqueeze(1), h.square(), weight_var.transpose(1, 2))
    return local_draw(mean, variance, noise(mean.shape))


def local_draw(mean: torch.Tensor, variance: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean + sqrt(variance)·eps``, the draw of a pre-activation from its moments (variance
    broadcastable to ``mean``). A point input with only point weights on it has no spread: the
    variance is floored at the dtype's smallest normal, so that the sqrt's gradient is finite."""
    std = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    return torch.addcmul(mean, std, eps)


def saved_backbone(net: nn.Module) -> dict[str, Any] | None:
    """``{"type": name, **spec()}`` for a registered backbone's exact class, else ``None``."""
    if own_kernels(net) is None or BACKBONES.get(type(net).__name__) is not type(net):
        return None
    return {"type": type(net).__name__, **net.spec()}


def relative_scales(net: nn.Module, ratio: float, names: tuple[str, ...] | None = None):
    """``ratio`` times the root mean square of each parameter's current values (``ratio`` for
    one that is all zeros), by name; only ``names`` when given."""
    out = {}
    for name, p in net.named_parameters():
        if names is None or name in names:
            rms = float(p.detach().double().square().mean().sqrt())
            out[name] = ratio * rms if rms > 0 else float(ratio)
    return out
