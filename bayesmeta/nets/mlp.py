"""A fully connected backbone and its task-batched kernel.

Parameter names are part of the contract (models put priors on them, ANIL adapts ``head.*``):
hidden layers are ``body.0``, ``body.1``, ..., the output layer is ``head``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bayesmeta.nets.backbone import Backbone, local_linear, register_backbone

__all__ = ["MLP"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
#: Tensors an MLP layer keeps for backward per input point, in units of its width (its
#: pre-activation, activation and the ELBO's copies).
_MLP_KEPT = 3.0


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass; MLP(True, ...) is a bug, not one feature.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@register_backbone
class MLP(Backbone):
    """Multi-layer perceptron ``in -> hidden[0] -> ... -> hidden[-1] -> out``.

    Parameters
    ----------
    in_features : int
        Input width.
    hidden : sequence of int
        Widths of the hidden layers (may be empty: then the net is one linear layer).
    out_features : int
        Output width.
    activation : {"relu", "tanh"}
        Nonlinearity after every hidden layer (none after the head).

    Notes
    -----
    ``forward`` maps a Tensor of shape ``[B, in_features]`` to ``[B, out_features]``. For ``T``
    tasks with their own weights use :func:`bayesmeta.nets.batched_forward`.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        widths = [_check_positive_int(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.in_features = in_features
        self.hidden = tuple(widths)
        self.out_features = out_features
        self.activation = activation
        sizes = [in_features, *widths]
        self.body = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.head = nn.Linear(sizes[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``[B, in_features]`` to ``[B, out_features]``."""
        act = _ACTIVATIONS[self.activation]
        for layer in self.body:
            x = act(layer(x))
        return self.head(x)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    # the Backbone protocol: one baddbmm per layer over all weight sets ---------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def choose_kernel(self, device: torch.device, groups: int) -> str:
        return "mlp"

    def batched(self, params, x, context, kernel, features=False):
        return _mlp_batched(self, params, x, features=features)

    def batched_local(self, loc, var, x, context, noise):
        act = _ACTIVATIONS[self.activation]
        names = [f"body.{i}" for i in range(len(self.body))] + ["head"]
        h = x
        for i, name in enumerate(names):
            w, b = f"{name}.weight", f"{name}.bias"
            h = local_linear(h, loc[w], loc[b], var.get(w), var.get(b), noise)
            if i < len(names) - 1:
                h = act(h)
        return h

    def activation_bytes(self, points: int) -> int:
        size = next(self.parameters()).element_size()
        return int(_MLP_KEPT * size * (sum(self.hidden) + self.out_features) * points)

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "hidden": list(self.hidden),
            "out_features": self.out_features,
            "activation": self.activation,
        }


def _mlp_batched(
    net: MLP, params: Mapping[str, torch.Tensor], x: torch.Tensor, features: bool = False
) -> torch.Tensor:
    """Group-batched MLP forward: one ``baddbmm`` per layer over all groups.

    Parameters
    ----------
    net : MLP
        Supplies the architecture only; its own parameters are not read.
    params : mapping of str to Tensor
        Every parameter of ``net``, shaped ``[G, *param.shape]``.
    x : Tensor of shape ``[G, B, in_features]``
    features : stop before the head (whose weights need not be in ``params``)

    Returns
    -------
    Tensor of shape ``[G, B, out_features]``, or the head's input ``[G, B, F]`` with ``features``
    """
    act = _ACTIVATIONS[net.activation]
    names = [f"body.{i}" for i in range(len(net.body))] + ([] if features else ["head"])
    h = x
    for i, name in enumerate(names):
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        # bias [G, 1, out] + h [G, B, in] @ weight^T [G, in, out]; one fused call per layer.
        h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        if features or i < len(names) - 1:
            h = act(h)
    return h
