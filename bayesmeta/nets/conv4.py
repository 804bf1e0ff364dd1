"""The four-block convolutional backbone of Vinyals et al. (2016) and Finn et al. (2017).

Parameter names are part of the contract: block ``i`` holds ``body.{i}.conv.{weight,bias}`` and
``body.{i}.norm.{weight,bias}``; the classifier is ``head.{weight,bias}``.

Normalisation never looks at the batch it is asked to predict. Batch normalisation takes its
statistics from a *context*: the task's support set, passed beside the queries, so that a
query's output is the same alone as inside any batch. Without a context a batch is its own
context, which is right for the support set itself and transductive for a query batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bayesmeta.nets.backbone import (
    DEFAULT_PRIOR_SCALE,
    LINEAR_HEAD,
    Backbone,
    local_draw,
    local_linear,
    register_backbone,
    relative_scales,
)

__all__ = ["Conv4"]

_NUM_BLOCKS = 4
#: Normalisation layers of :class:`Conv4`, and the parameters of each.
NORMS = ("batch", "layer", "task")
_NORM_PARAMS = {"batch": ("weight", "bias"), "layer": ("weight", "bias")}
_NORM_PARAMS["task"] = ("weight", "bias", "scale", "offset")
#: Tensors a Conv4 block keeps for backward per input point, in units of its conv output's
#: size (the conv, normalisation and ReLU outputs and the pooling's), a little above the
#: measured ratio (docs/performance.md) so that the estimate errs on the safe side.
_CONV4_KEPT = 4.5


class TaskNorm2d(nn.Module):
    """TaskNorm-I (Bronskill et al. 2020): batch statistics of the context mixed with each
    image's own (instance) statistics, ``α = sigmoid(scale · n + offset)`` for a context of
    ``n`` images, with a per-channel ``weight`` and ``bias`` as batch norm's. Only the
    parameters live here; :func:`_normalise` computes it (see :class:`Conv4`)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.scale = nn.Parameter(torch.zeros(1))
        self.offset = nn.Parameter(torch.zeros(1))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@register_backbone
class Conv4(Backbone):
    """Few-shot backbone: four blocks of conv 3x3 (padding 1), a normalisation, ReLU, max-pool 2x2.

    With ``norm="batch"`` each block normalises every channel with the mean and variance of a
    reference batch, in training and evaluation alike, and keeps no running statistics: the
    ``context`` images when given (a task's support set), else the batch itself. With
    ``norm="layer"`` each image is normalised over its own channels and pixels (``GroupNorm``
    with one group), which needs no batch at all. ``norm="task"`` is TaskNorm-I
    (:class:`TaskNorm2d`): the context's batch statistics mixed with each image's own, with a
    learned mixing weight per block. All have a learned scale and shift per channel.

    Parameters
    ----------
    in_channels : int
        Channels ``C`` of the input images (1 for Omniglot).
    ways : int
        Number of classes ``N``; the width of the logits.
    hidden : int
        Channels of every convolution (64 in the papers).
    image_size : int
        Height and width of the (square) input, at least 16. The head sees
        ``hidden * s * s`` features with ``s = image_size // 16`` (28 -> 1, 84 -> 5).
    zero_head : bool
        Start the classifier's weight and bias at zero. Few-shot labels are permuted afresh
        in every task, so any other initial head favours some classes for no reason; from a
        zero head, one inner step gives each class the (scaled) mean feature of its support
        images, a prototype classifier, and MAML meta-learns faster from it
        (docs/methods.md, "Measured choices behind the defaults").
    norm : {"batch", "layer", "task"}
        The normalisation of every block (see above).

    Notes
    -----
    ``forward(x, context=None)`` maps a Tensor of shape ``[B, C, image_size, image_size]`` to
    logits ``[B, N]``; ``context`` ``[S, C, image_size, image_size]`` supplies batch
    normalisation's statistics. For ``T`` tasks with their own weights use
    :func:`bayesmeta.nets.batched_forward`.
    """

    def __init__(
        self,
        in_channels: int,
        ways: int,
        hidden: int = 64,
        image_size: int = 28,
        zero_head: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.ways = _check_int("ways", ways, 1)
        self.hidden = _check_int("hidden", hidden, 1)
        # Four floor-halvings must leave at least one pixel.
        self.image_size = _check_int("image_size", image_size, 16)
        blocks = []
        for i in range(_NUM_BLOCKS):
            cin = in_channels if i == 0 else hidden
            block = OrderedDict(
                conv=nn.Conv2d(cin, hidden, kernel_size=3, padding=1),
                norm=_norm_layer(norm, hidden),
                relu=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
            blocks.append(nn.Sequential(block))
        self.body = nn.Sequential(*blocks)
        side = image_size
        for _ in range(_NUM_BLOCKS):
            side //= 2
        self.feature_size = hidden * side * side
        self.head = nn.Linear(self.feature_size, ways)
        if not isinstance(zero_head, bool):
            raise ValueError(f"zero_head must be a bool, got {zero_head!r}")
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Map images ``[B, C, H, W]`` (``H = W = image_size``) to logits ``[B, N]``, with batch
        normalisation's statistics from ``context`` ``[S, C, H, W]`` (default: ``x`` itself)."""
        # Read through the attributes, so that torch.func.functional_call's weights are used.
        params = {}
        for i, block in enumerate(self.body):
            for part, names in (("conv", ("weight", "bias")), ("norm", _NORM_PARAMS[self.norm])):
                layer = getattr(block, part)
                for name in names:
                    params[f"body.{i}.{part}.{name}"] = getattr(layer, name).unsqueeze(0)
        params["head.weight"] = self.head.weight.unsqueeze(0)
        params["head.bias"] = self.head.bias.unsqueeze(0)
        ctx = None if context is None else context.unsqueeze(0)
        # torch's own pooling: the faster CPU kernel cannot run under torch.func.vmap.
        return _conv4_grouped(self, params, x.unsqueeze(0), ctx, pool=_plain_pool)[0]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, norm={self.norm!r}"

    # the Backbone protocol --------------------------------------------------------------
    kernels = ("loop", "grouped")
    loops_tasks_off_cuda = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    def choose_kernel(self, device: torch.device, groups: int) -> str:
        return _choose_conv4_kernel(device, groups)

    def batched(self, params, x, context, kernel, features=False):
        run = _conv4_grouped if kernel == "grouped" else _conv4_loop
        return run(self, params, x, context, features=features)

    def batched_local(self, loc, var, x, context, noise):
        # The grouped kernel whatever the device: the noise source pairs draws across groups,
        # so every group's layer must be drawn in one call.
        return _conv4_grouped(self, loc, x, context, local=_Local(var, noise, x.shape[0]))

    def supports_local(self) -> bool:
        # TaskNorm's mixing weight is a nonlinear function of its scale and offset.
        return self.norm != "task"

    def activation_bytes(self, points: int) -> int:
        size = next(self.parameters()).element_size()
        side, per_point = self.image_size, 0
        for _ in range(_NUM_BLOCKS):  # (each block halves the side by its max-pool)
            per_point += self.hidden * side * side
            side //= 2
        return int(_CONV4_KEPT * size * per_point * points)

    def default_prior_scale(self) -> dict[str, float]:
        """The body's weights a tenth of their initial RMS, the head's
        :data:`~bayesmeta.nets.backbone.DEFAULT_PRIOR_SCALE`. Every block normalises its
        activations, so a body weight's scale carries no meaning of its own, and σ = 0.1 on
        conv weights of RMS ~0.02 made every draw noise (bayes and bmaml stayed at chance on
        Omniglot; tests/inference/test_defaults.py). The head's σ is on the logits' scale."""
        body = tuple(n for n, _ in self.named_parameters() if n not in LINEAR_HEAD)
        head = dict.fromkeys(LINEAR_HEAD, DEFAULT_PRIOR_SCALE)
        return {**relative_scales(self, 0.1, body), **head}

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "ways": self.ways,
            "hidden": self.hidden,
            "image_size": self.image_size,
            "norm": self.norm,
        }


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return TaskNorm2d(channels)


def _plain_pool(h: torch.Tensor) -> torch.Tensor:
    return F.relu(F.max_pool2d(h, 2))


def _relu_max_pool2(h: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(F.relu(h), 2)`` for ``h`` of shape ``[B, C, H, W]``, faster off CUDA.

    ReLU comes after the pooling: both are monotone, so the values are the same, and so is
    every derivative (a window whose maximum is not positive passes no gradient either way),
    but ReLU and its backward then touch a quarter of the elements, and meta-steps run faster.

    The pooling itself: on CPU torch's max-pool kernel for ``channels_last`` input is far
    faster than the one for contiguous ``NCHW`` input, but a network kept in ``channels_last``
    runs its second-order backward slower (mixed layouts in the elementwise gradients). So only
    the argmax is found in ``channels_last``; the values are gathered from ``h`` as laid out,
    which keeps every gradient in ``NCHW``. The gather's backward scatters to the argmax exactly
    as max-pooling's does, and its own backward is a gather, so second-order MAML sees the same
    function; forward and backward both run faster than the ``NCHW`` kernel's. CUDA keeps
    torch's own pooling kernel, with ReLU after it too; neither choice has been measured on a
    GPU. The timings are in docs/performance.md, "Conv4 kernels and pooling".
    """
    if h.device.type == "cuda":
        return _plain_pool(h)
    b, c, height, width = h.shape
    with torch.no_grad():
        _, argmax = F.max_pool2d_with_indices(h.contiguous(memory_format=torch.channels_last), 2)
    # argmax holds flat indices into each [H, W] plane, whatever the input's memory layout.
    flat = h.reshape(b, c, height * width).gather(2, argmax.contiguous().reshape(b, c, -1))
    return F.relu(flat.reshape(b, c, height // 2, width // 2))


def _conv4_grouped(
    net: Conv4,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    context: torch.Tensor | None = None,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
    features: bool = False,
    local: _Local | None = None,
) -> torch.Tensor:
    """Group-batched Conv4 forward as one grouped convolution per block.

    The ``G`` groups become ``G`` blocks of channels: images ``[G, B, C, H, W]`` are laid out as
    ``[B, G*C, H, W]`` and each convolution uses ``groups=G`` with weights ``[G*Cout, Cin, 3, 3]``.
    BatchNorm over channel ``g*Cout + c`` then reduces over ``(B, H, W)`` of group ``g`` only, so
    the statistics stay per group (per task, per particle) with a single call. A context runs
    through the blocks ahead of ``x`` (its rows first), and only its rows give the statistics.

    Parameters
    ----------
    net : Conv4
        Supplies the architecture (and the normalisation's ``eps``); its own parameters are not
        read.
    params : mapping of str to Tensor
        Every parameter of ``net``, shaped ``[G, *param.shape]``.
    x : Tensor of shape ``[G, B, C, H, W]``
    context : Tensor of shape ``[G, S, C, H, W]``, optional
        Batch normalisation's reference images per group (default: ``x`` itself).
    pool : ReLU then 2x2 max-pooling of ``[B, C, H, W]`` (default :func:`_relu_max_pool2`)
    features : stop before the head (whose weights need not be in ``params``)
    local : the variances of the weights with a spread and a noise source: every layer's
        outputs are then drawn per point by the local reparameterisation trick
        (:meth:`Conv4.batched_local`), ``params`` being the means

    Returns
    -------
    Tensor of shape ``[G, B, N]``, or the head's input ``[G, B, F]`` with ``features``
    """
    reference = None
    if context is not None and net.norm != "layer":
        reference = context.shape[1]
        x = torch.cat([context, x], 1)
    g, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, g * x.shape[2], *x.shape[3:])
    for i, block in enumerate(net.body):
        weight = params[f"body.{i}.conv.weight"]
        conv = partial(F.conv2d, padding=1, groups=g)
        out = conv(
            h,
            weight.reshape(g * weight.shape[1], *weight.shape[2:]),
            params[f"body.{i}.conv.bias"].reshape(-1),
        )
        if local is not None:
            out = local.conv(out, h, f"body.{i}.conv", conv)
        norm = {k: params[f"body.{i}.norm.{k}"].reshape(-1) for k in _NORM_PARAMS[net.norm]}
        if local is None:
            h = _normalise(net.norm, out, g, norm, block.norm.eps, reference)
        else:  # (normalised without the affine, which the local draws apply)
            unit = {
                "weight": torch.ones_like(norm["weight"]),
                "bias": torch.zeros_like(norm["bias"]),
            }
            h = _normalise(net.norm, out, g, unit, block.norm.eps, reference)
            h = local.affine(h, norm["weight"], norm["bias"], f"body.{i}.norm")
        h = (pool or _relu_max_pool2)(h)
    if reference is not None:
        h, b = h[reference:], b - reference
    # [B, G*hidden, s, s] -> [G, B, hidden*s*s]: the same (channel, row, col) order as flatten(1).
    h = h.reshape(b, g, -1).transpose(0, 1)
    if features:
        return h
    if local is not None:
        return local_linear(
            h, params["head.weight"], params["head.bias"], local.var.get("head.weight"),
            local.var.get("head.bias"), local.noise,
        )  # fmt: skip
    return torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))


class _Local:
    """The local reparameterisation's draws for :func:`_conv4_grouped`'s channel-blocked
    layout ``[B, G·C, H, W]``: the variances by name (``[G, *shape]``) and the noise source,
    which is asked for ``[G, B, C, H, W]`` (groups first, as :func:`local_forward` promises)."""

    def __init__(self, var: Mapping[str, torch.Tensor], noise, groups: int):
        self.var, self.noise, self.groups = var, noise, groups

    def _draw(self, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        b, gc, *rest = mean.shape
        eps = self.noise(torch.Size([self.groups, b, gc // self.groups, *rest]))
        return local_draw(mean, variance, eps.transpose(0, 1).reshape(mean.shape))

    def conv(self, mean: torch.Tensor, h: torch.Tensor, name: str, conv) -> torch.Tensor:
        """Draws around the convolution's ``mean`` of inputs ``h``: variance ``conv(h², V) + v``."""
        vw, vb = self.var.get(f"{name}.weight"), self.var.get(f"{name}.bias")
        if vw is None and vb is None:
            return mean
        bias = None if vb is None else vb.reshape(1, -1, 1, 1)
        if vw is None:
            return self._draw(mean, bias)
        variance = conv(h.square(), vw.reshape(-1, *vw.shape[2:]), None)
        return self._draw(mean, variance if bias is None else variance + bias)

    def affine(self, h, weight, bias, name: str) -> torch.Tensor:
        """The normalisation's affine map ``h·γ + β`` per channel, drawn per point."""
        mean = torch.addcmul(bias[:, None, None], h, weight[:, None, None])
        vw, vb = self.var.get(f"{name}.weight"), self.var.get(f"{name}.bias")
        if vw is None and vb is None:
            return mean
        variance = 0.0 if vw is None else h.square() * vw.reshape(-1, 1, 1)
        variance = variance if vb is None else variance + vb.reshape(-1, 1, 1)
        return self._draw(mean, variance.expand_as(mean))


def _normalise(
    norm: str,
    h: torch.Tensor,
    groups: int,
    params: Mapping[str, torch.Tensor],
    eps: float,
    reference: int | None,
) -> torch.Tensor:
    """One block's normalisation of ``h [B, G*C, H, W]``: layer norm per image and group, or
    batch norm (plain, or mixed with instance norm: TaskNorm-I) with the statistics of the first
    ``reference`` rows (all rows when ``None``). ``params``: ``weight``, ``bias`` ``[G*C]`` and
    for TaskNorm ``scale``, ``offset`` ``[G]``."""
    weight, bias = params["weight"], params["bias"]
    if norm == "layer":
        return F.group_norm(h, groups, weight, bias, eps)
    if norm == "batch" and reference is None:
        return F.batch_norm(h, None, None, weight, bias, training=True, eps=eps)
    ref = h if reference is None else h[:reference]
    var, mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)  # [G*C]
    if norm == "batch":
        scale = weight * torch.rsqrt(var + eps)
        shift = bias - mean * scale
        return torch.addcmul(shift[:, None, None], h, scale[:, None, None])
    # TaskNorm-I: moments of the mixture of the context's and each image's distribution.
    alpha = torch.sigmoid(params["scale"] * ref.shape[0] + params["offset"])  # [G]
    alpha = alpha.repeat_interleave(h.shape[1] // groups)[:, None, None]  # [G*C, 1, 1]
    var_in, mean_in = torch.var_mean(h, dim=(2, 3), keepdim=True, correction=0)  # [B, G*C, 1, 1]
    mean_bn, var_bn = mean[:, None, None], var[:, None, None]
    mix = alpha * mean_bn + (1 - alpha) * mean_in
    mix_var = alpha * (var_bn + (mean_bn - mix).square()) + (1 - alpha) * (
        var_in + (mean_in - mix).square()
    )
    scale = weight[:, None, None] * torch.rsqrt(mix_var + eps)
    return torch.addcmul(bias[:, None, None] - mix * scale, h, scale)


def _conv4_loop(
    net: Conv4,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    context: torch.Tensor | None = None,
    features: bool = False,
) -> torch.Tensor:
    """Group-batched Conv4 forward as a Python loop of ordinary convolutions, one per group.

    Same arguments and result as :func:`_conv4_grouped`; each group runs it with ``G = 1``,
    i.e. with plain (ungrouped) convolutions.
    """
    # unbind's backward stacks the G gradients once; slicing v[i : i + 1] would allocate a
    # zero-filled [G, ...] gradient per group and sum G of them.
    per_group = {k: v.unbind(0) for k, v in params.items()}
    contexts = [None] * x.shape[0] if context is None else context.unbind(0)
    outs = [
        _conv4_grouped(
            net,
            {k: v[i].unsqueeze(0) for k, v in per_group.items()},
            xi.unsqueeze(0),
            None if ci is None else ci.unsqueeze(0),
            features=features,
        )
        for i, (xi, ci) in enumerate(zip(x.unbind(0), contexts, strict=True))
    ]
    return torch.cat(outs, dim=0)


def _choose_conv4_kernel(device: torch.device, groups: int) -> str:
    """Pick the Conv4 kernel of :func:`bayesmeta.nets.batched_forward` for ``groups`` groups.

    Returns ``"loop"`` (:func:`_conv4_loop`) or ``"grouped"`` (:func:`_conv4_grouped`); the
    ``vmap`` path was never the fastest, so it is only used when asked for.

    On CPU the two kernels are close at one and two groups (at one they run the same ops) and
    the loop is faster from four groups on, first and second order alike; ``vmap`` was slower
    than the loop at every group count. So CPU (and any non-CUDA device) uses the loop.
    On CUDA, where G small convolutions would each launch their own kernels and leave the GPU
    idle, the grouped convolution is used; that choice has not been measured on a GPU: re-run
    ``benchmarks/bench_forward.py`` on one to check it. The timings are in
    docs/performance.md, "Conv4 kernels and pooling".
    """
    if device.type == "cuda" and groups > 1:
        return "grouped"
    return "loop"
