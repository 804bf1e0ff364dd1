"""Task-batched functional forward: one call evaluates a network under ``G = P*T`` weight sets.

Parameters carry leading axes ``lead = (T,)`` or ``(P, T)`` (``P`` particles, ``T`` tasks);
inputs carry the task axis first. Internally ``lead`` is flattened to one group axis ``G``, a
kernel maps ``[G, *param.shape]`` weights and ``[G, B, *in_shape]`` inputs to ``[G, B, *out]``,
and the result is reshaped back to ``[*lead, B, *out]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap

from bayesmeta.nets.backbone import LINEAR_HEAD, has_local_kernel, local_linear, own_kernels
from bayesmeta.nets.memory import freed_memory_kept, task_chunk_for_memory

__all__ = [
    "batched_forward",
    "batched_features",
    "local_forward",
    "linear_head",
    "local_linear",
    "LINEAR_HEAD",
    "has_linear_head",
    "takes_context",
    "head_parameter_names",
    "preferred_task_chunk",
]

_KERNELS = ("auto", "vmap")


def batched_forward(
    net: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    *,
    context: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Evaluate ``net`` with one weight set per (particle, task), all in one call.

    Exactly ``torch.func.functional_call(net, {k: params[k][p, t]}, x[t])`` for every ``p, t``
    (with ``context=context[t]`` as a keyword when a context is given; differentiable twice,
    for second-order MAML), but batched.

    Parameters
    ----------
    net : nn.Module
        The architecture. Its own parameters are not used; its buffers are (fallback only).
    params : mapping of str to Tensor
        Every name of ``net.named_parameters()``, each mapped to a Tensor of shape
        ``[*lead, *param.shape]`` with ``lead = (T,)`` or ``(P, T)``, the same for all entries.
    x : Tensor of shape ``[T, B, *in_shape]`` or ``[*lead, B, *in_shape]``
        Inputs per task, shared by all particles, or one input per particle and task. For
        ``MLP``/``Conv4`` the two are told apart by ``x.ndim``; for other modules ``x`` is taken
        per particle when ``lead = (P, T)`` and ``x.shape[:2] == (P, T)``.
    context : Tensor of shape ``[T, S, *in_shape]`` or ``[*lead, S, *in_shape]``, optional
        Reference inputs per task (the support set) from which a network that normalises with
        batch statistics takes them, so that each row of ``x`` is mapped on its own. ``MLP``
        has no normalisation and ignores it; ``Conv4`` uses it unless ``norm="layer"``; another
        module receives it as ``forward(x, context=...)`` if its ``forward`` takes ``context``,
        and is called without it otherwise.
    kernel : {"auto", "vmap"} or one of the backbone's ``kernels``
        ``"auto"``: a :class:`~bayesmeta.nets.Backbone` picks its own kernel for the device and
        ``G`` (``MLP``: batched matrix products; ``Conv4``: ``"loop"`` or ``"grouped"``), any
        other module runs ``torch.func.vmap`` of ``functional_call``. ``"vmap"`` forces the
        generic path. Results agree to rounding.

    Returns
    -------
    Tensor of shape ``[*lead, B, *out_shape]``

    Raises
    ------
    ValueError
        If ``params`` misses or adds a name, a trailing shape is not the parameter's, the lead
        shapes differ or have neither one nor two axes, ``x`` does not match ``T`` (or ``lead``)
        or ``net``'s input shape, ``context`` does not match like ``x``, or ``kernel`` is unknown
        or not available for ``net``.

    Notes
    -----
    A backbone's kernels stand for its class's ``forward``: a subclass that overrides
    ``forward`` takes the generic path. The generic path runs the module
    under ``vmap`` with ``randomness="different"`` (independent dropout masks per group); a
    module that updates buffers in place (BatchNorm with running statistics in training mode)
    cannot run under ``vmap``.
    """
    own = own_kernels(net)
    choices = (*_KERNELS, *(own.kernels if own is not None else ()))
    if kernel not in choices:
        raise ValueError(
            f"kernel must be one of {choices} for {type(net).__name__}, got {kernel!r}"
        )
    lead = _check_params(net, params)
    groups = math.prod(lead)
    xg = _group_input(net, x, lead)
    cg = None if context is None else _group_input(net, context, lead, "context")
    if cg is not None and own is None and not takes_context(net):
        cg = None  # nothing in it normalises with batch statistics (see MetaLearner's check)
    flat = {name: params[name].reshape(groups, *s) for name, s in _parameter_shapes(net).items()}
    if kernel == "auto" and own is not None:
        kernel = own.choose_kernel(xg.device, groups)
    if own is None or kernel in _KERNELS:
        out = _vmap_forward(net, flat, xg, cg)
    else:
        out = own.batched(flat, xg, cg, kernel)
    return out.reshape(*lead, *out.shape[1:])


def local_forward(
    net: nn.Module,
    loc: Mapping[str, torch.Tensor],
    var: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    noise: Callable[[torch.Size], torch.Tensor],
    *,
    particles: int = 1,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs of ``net`` under mean-field Gaussian weights by the local reparameterisation
    trick: every layer's pre-activations are drawn per input point from their Gaussian given
    the layer's input, ``Normal(h·m, h²·s²)`` for a linear layer. In distribution this is each
    point drawing its own weights, so a loss summed over points has the same expectation (and
    gradients in ``m`` and ``s``) as under shared weight draws, with less variance.

    Parameters
    ----------
    net : a backbone with a local kernel (:func:`~bayesmeta.nets.backbone.has_local_kernel`)
    loc : every name of ``net.named_parameters()`` → ``[T, *shape]``, the weights' means
    var : the names whose weights have a spread → variances ``[T, *shape]``; any other weight
        is a point
    x : Tensor ``[T, B, *in_shape]``;  context : as in :func:`batched_forward`
    noise : ``noise(shape)`` gives standard normal draws of ``shape`` (groups first,
        ``[P·T, B, ...]``), called for each drawn layer output (a Conv4 block draws its
        convolution and its normalisation's affine map)
    particles : ``P``, draws per task (independent, or paired, as ``noise`` makes them)

    Returns
    -------
    Tensor of shape ``[P, T, B, *out_shape]``
    """
    if not has_local_kernel(net):
        raise ValueError(
            f"net must be a backbone with a local kernel (MLP, Conv4 without TaskNorm), got "
            f"{type(net).__name__}"
        )
    (T,) = _check_params(net, loc)
    unknown = [n for n in var if n not in loc]
    bad = [n for n in var if n in loc and var[n].shape != loc[n].shape]
    if unknown or bad:
        raise ValueError(
            f"var must map names of loc to tensors of their shape: unknown {unknown}, "
            f"shape differs {bad}"
        )
    groups, lead = particles * T, (particles, T)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).expand(particles, *t.shape).reshape(groups, *t.shape[1:])

    xg = _group_input(net, x, lead)
    cg = None if context is None else _group_input(net, context, lead, "context")
    out = own_kernels(net).batched_local(
        {n: grouped(t) for n, t in loc.items()},
        {n: grouped(t) for n, t in var.items()},
        xg,
        cg,
        noise,
    )
    return out.reshape(*lead, *out.shape[1:])


def has_linear_head(net: nn.Module) -> bool:
    """Whether ``net`` is a backbone whose output is a linear map ``head.weight [O, F]``,
    ``head.bias [O]`` (:data:`LINEAR_HEAD`) of features that :func:`batched_features` computes
    (a :class:`~bayesmeta.nets.backbone.Backbone`, e.g. ``MLP``, ``Conv4``)."""
    return own_kernels(net) is not None


def batched_features(
    net: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    *,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input of ``net``'s linear head, per weight set: ``batched_forward`` is exactly
    :func:`linear_head` of these.

    Parameters
    ----------
    net : MLP or Conv4 (see :func:`has_linear_head`)
    params : mapping of str to Tensor
        Every parameter of ``net`` outside ``head`` (head weights may be present; unused), each
        ``[*lead, *param.shape]``.
    x, context : as in :func:`batched_forward`

    Returns
    -------
    Tensor of shape ``[*lead, B, F]``
    """
    own = own_kernels(net)
    if own is None:
        raise ValueError(
            f"batched_features needs a Backbone (MLP, Conv4), got {type(net).__name__}; use "
            "batched_forward"
        )
    body = {k: v for k, v in params.items() if not k.startswith("head.")}
    shapes = {n: s for n, s in _parameter_shapes(net).items() if not n.startswith("head.")}
    if not shapes:
        return _group_input(net, x, (x.shape[0],))  # the head is all: its input is the input
    lead = _check_params(net, body, exclude="head.")
    groups = math.prod(lead)
    xg = _group_input(net, x, lead)
    cg = None if context is None else _group_input(net, context, lead, "context")
    flat = {name: body[name].reshape(groups, *shape) for name, shape in shapes.items()}
    kernel = own.choose_kernel(xg.device, groups)
    out = own.batched(flat, xg, cg, kernel, features=True)
    return out.reshape(*lead, *out.shape[1:])


def linear_head(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``features @ weight.T + bias`` per weight set, broadcasting the lead axes.

    Parameters
    ----------
    weight : Tensor of shape ``[*lead, O, F]``;  bias : Tensor of shape ``[*lead, O]``
    features : Tensor of shape ``[*lead', B, F]`` with ``lead'`` broadcastable to ``lead``
        (e.g. features ``[T, B, F]`` of a shared body for weights ``[P, T, O, F]``)

    Returns
    -------
    Tensor of shape ``[*lead, B, O]``
    """
    return torch.matmul(features, weight.transpose(-1, -2)) + bias.unsqueeze(-2)


#: Tasks per backward pass for a backbone that loops over tasks off CUDA (Conv4; see
#: :func:`preferred_task_chunk`): one when the allocator keeps freed memory, else eight.
CPU_LOOP_TASK_CHUNK = 8


def preferred_task_chunk(
    net: nn.Module, device: torch.device | str, points_per_task: int | None = None
) -> int | None:
    """How many tasks a meta-step should backpropagate at once (``None``: all of them).

    A Conv4 off CUDA runs its tasks one after another anyway (the ``"loop"`` kernel), so a
    whole meta-batch gains nothing from one backward pass and pays for keeping every task's
    activations alive. Once the allocator keeps freed memory
    (:func:`bayesmeta.nets.memory.keep_freed_memory`) one task per backward pass is as fast
    as any other chunk, near learn2learn's peak memory, so that is the choice; otherwise every
    pass faults its memory in afresh, and chunks of ``CPU_LOOP_TASK_CHUNK`` tasks are the
    faster compromise (timings: docs/performance.md, "Task chunks and memory"). Everything
    else (MLPs, CUDA) batches the whole meta-batch.

    With ``points_per_task`` (inputs forwarded per task with their graph kept), the chunk is
    also at most what fits the activation-memory budget
    (:func:`bayesmeta.nets.memory.task_chunk_for_memory`).
    """
    chunk = None
    own = own_kernels(net)
    if own is not None and own.loops_tasks_off_cuda and torch.device(device).type != "cuda":
        chunk = 1 if freed_memory_kept() else CPU_LOOP_TASK_CHUNK
    fits = None if points_per_task is None else task_chunk_for_memory(net, device, points_per_task)
    if fits is None:
        return chunk
    return fits if chunk is None else min(chunk, fits)


def head_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters of the last layer (the ones ANIL adapts).

    Parameters
    ----------
    net : nn.Module

    Returns
    -------
    list of str
        For ``MLP`` and ``Conv4``: ``["head.weight", "head.bias"]``. For any other module: the
        parameters owned directly (not through children) by the last module, in registration
        order of ``net.named_modules()``, that owns any; e.g. the final ``nn.Linear`` of an
        ``nn.Sequential``.
    """
    if own_kernels(net) is not None:
        return list(LINEAR_HEAD)
    owners = [
        (prefix, module)
        for prefix, module in net.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    if not owners:
        raise ValueError(f"net must have parameters, got a {type(net).__name__} without any")
    prefix, module = owners[-1]
    return [
        f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)
    ]


def _parameter_shapes(net: nn.Module) -> dict[str, torch.Size]:
    """Name → shape of ``net``'s parameters. Kept on bayesmeta's own backbones, whose
    parameters are fixed when they are built: walking the modules for them at every forward
    was a visible share of a small meta-step (docs/performance.md, "Parameter shapes")."""
    if own_kernels(net) is None:
        return {name: p.shape for name, p in net.named_parameters()}
    shapes = net.__dict__.get("_parameter_shapes")
    if shapes is None:
        shapes = {name: p.shape for name, p in net.named_parameters()}
        net.__dict__["_parameter_shapes"] = shapes
    return shapes


def _check_params(
    net: nn.Module, params: Mapping[str, torch.Tensor], exclude: str | None = None
) -> tuple[int, ...]:
    """Validate ``params`` against ``net`` (its names not starting with ``exclude``) and return
    the common lead shape."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to tensors, got {type(params)}")
    expected = {
        k: v
        for k, v in _parameter_shapes(net).items()
        if exclude is None or not k.startswith(exclude)
    }
    if not expected:
        raise ValueError(f"net must have parameters, got a {type(net).__name__} without any")
    missing = [name for name in expected if name not in params]
    extra = [name for name in params if name not in expected]
    if missing or extra:
        raise ValueError(
            "params must map exactly the names of net.named_parameters(): "
            f"missing {missing}, unexpected {extra}"
        )
    lead, first = None, None
    for name, shape in expected.items():
        value = params[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"params[{name!r}] must be a Tensor, got {type(value).__name__}")
        k = value.ndim - len(shape)
        if k not in (1, 2) or value.shape[k:] != shape:
            raise ValueError(
                f"params[{name!r}] must have shape [T, *{list(shape)}] or "
                f"[P, T, *{list(shape)}], got {list(value.shape)}"
            )
        if lead is None:
            lead, first = tuple(value.shape[:k]), name
        elif tuple(value.shape[:k]) != lead:
            raise ValueError(
                "params must share one lead shape (T,) or (P, T): "
                f"params[{first!r}] has {lead}, params[{name!r}] has {tuple(value.shape[:k])}"
            )
    return lead


def _input_shape(net: nn.Module) -> tuple[int, ...] | None:
    """The per-example input shape of a backbone, ``None`` for other modules."""
    own = own_kernels(net)
    return None if own is None else own.input_shape


def takes_context(net: nn.Module) -> bool:
    """Whether ``net.forward`` accepts a ``context`` (the support inputs it normalises with)."""
    return "context" in inspect.signature(net.forward).parameters


def _group_input(
    net: nn.Module, x: torch.Tensor, lead: tuple[int, ...], what: str = "x"
) -> torch.Tensor:
    """Validate ``x`` (named ``what`` in errors) and lay it out as ``[G, B, *in_shape]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a Tensor, got {type(x).__name__}")
    event = _input_shape(net)
    if event is not None:
        per_particle = len(lead) == 2 and x.ndim == len(event) + 3
        if x.ndim not in (len(event) + 2, len(lead) + len(event) + 1):
            raise ValueError(
                f"{what} must have shape [T, B, *{list(event)}] or [*lead, B, *{list(event)}] "
                f"with lead={lead}, got {list(x.shape)}"
            )
        if x.shape[x.ndim - len(event) :] != event:
            raise ValueError(
                f"{what} must end in the input shape {list(event)} of {type(net).__name__}, "
                f"got {list(x.shape)}"
            )
    else:
        per_particle = len(lead) == 2 and x.ndim >= 3 and tuple(x.shape[:2]) == lead
    if per_particle:
        if tuple(x.shape[:2]) != lead:
            raise ValueError(
                f"{what} with one input per particle must have shape [P, T, B, ...] = "
                f"[{lead[0]}, {lead[1]}, B, ...], got {list(x.shape)}"
            )
        return x.reshape(lead[0] * lead[1], *x.shape[2:])
    if x.ndim < 2 or x.shape[0] != lead[-1]:
        raise ValueError(
            f"{what} must have the task axis first, shape [T, B, ...] with T={lead[-1]} "
            f"(the lead {lead} of params), got {list(x.shape)}"
        )
    if len(lead) == 2:
        # Every particle sees the same inputs; expand is free, reshape copies once.
        x = x.unsqueeze(0).expand(lead[0], *x.shape).reshape(lead[0] * lead[1], *x.shape[1:])
    return x


def _vmap_forward(
    net: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generic kernel: ``vmap`` of ``functional_call`` over the group axis.

    Parameters
    ----------
    net : nn.Module
    params : mapping of str to Tensor, each of shape ``[G, *param.shape]``
    x : Tensor of shape ``[G, B, *in_shape]``
    context : Tensor of shape ``[G, S, *in_shape]``, optional; passed as ``context=``

    Returns
    -------
    Tensor of shape ``[G, B, *out_shape]``
    """
    if context is None:

        def call(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(net, p, (xi,))

        return vmap(call, randomness="different")(dict(params), x)

    def call_with(p: dict[str, torch.Tensor], xi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (xi,), {"context": ci})

    return vmap(call_with, randomness="different")(dict(params), x, context)
