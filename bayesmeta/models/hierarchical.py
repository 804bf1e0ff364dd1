"""The hierarchical Bayesian neural network shared by all tasks.

Global parameters θ = (μ, σ): one mean and one positive scale per weight of a backbone. The
means are the backbone's own parameters (so μ starts at the backbone's initialisation); the
scales are ``softplus`` of unconstrained parameters. Task weights ``w_t ~ Normal(μ, σ)`` are Pyro
sample sites named after the backbone's parameters, inside ``pyro.plate("tasks", T, dim=-2)``;
observations sit inside ``pyro.plate("data", B, dim=-1)``. A vectorised particle plate (Pyro's
``vectorize_particles`` or ``Predictive(parallel=True)``) adds one more axis on the left.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from bayesmeta.models.likelihoods import Likelihood
from bayesmeta.nets import batched_forward
from bayesmeta.nets.backbone import DEFAULT_PRIOR_SCALE, Backbone, relative_scales

__all__ = ["HierarchicalBNN", "Hyperprior", "relative_prior_scale"]


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def relative_prior_scale(net: nn.Module, ratio: float = 0.1) -> dict[str, float]:
    """Prior scales for :class:`HierarchicalBNN`, each weight tensor's ``ratio`` times the root
    mean square of its initial values (``ratio`` for a tensor that starts at zero), by name.

    A draw then perturbs every layer by the same share of its size. On a network that
    normalises its activations (``Conv4``) a layer's scale carries no meaning, and one σ for
    all would drown its small convolution weights in noise: ``bayes`` on Omniglot stayed at
    chance under σ = 0.1 everywhere and learned under this (tests/inference/test_defaults.py).
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be a positive float, got {ratio!r}")
    return relative_scales(net, ratio)


def _check_scales(prior_scale, net: nn.Module) -> dict[str, float] | None:
    """``prior_scale`` as name → positive float (``None``: flat; ``"auto"``: what the backbone
    declares, :meth:`~bayesmeta.nets.Backbone.default_prior_scale`), or a ``ValueError``."""
    if prior_scale is None:
        return None
    if isinstance(prior_scale, str) and prior_scale == "auto":
        own = isinstance(net, Backbone)  # (a user's module declares nothing)
        prior_scale = net.default_prior_scale() if own else DEFAULT_PRIOR_SCALE
    names = [n for n, _ in net.named_parameters()]
    if isinstance(prior_scale, Mapping):
        missing = [n for n in names if n not in prior_scale]
        unknown = [n for n in prior_scale if n not in names]
        if missing or unknown:
            raise ValueError(
                f"prior_scale must name every weight of net: missing {missing}, unknown {unknown}"
            )
        scales = {n: prior_scale[n] for n in names}
    else:
        scales = dict.fromkeys(names, prior_scale)
    for name, value in scales.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise ValueError(
                f"prior_scale must be a positive float, a mapping of weight names to them, "
                f"'auto' or None, got {value!r}"
                + (f" for {name!r}" if isinstance(prior_scale, Mapping) else "")
            )
    return {n: float(v) for n, v in scales.items()}


@dataclass(frozen=True)
class Hyperprior:
    """Hyperprior on θ as in Ravi & Beatson (2019): ``μ ~ Normal(0, loc_scale)`` and the
    precision ``σ⁻² ~ Gamma(concentration, rate)``, per weight. Meta-training takes θ at its
    MAP under this prior (the density of the precision is evaluated at ``σ⁻²``)."""

    loc_scale: float = 1.0
    concentration: float = 1.0
    rate: float = 0.01

    def __post_init__(self) -> None:
        for name in ("loc_scale", "concentration", "rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Hyperprior.{name} must be positive and finite, got {value!r}")


class HierarchicalBNN(nn.Module):
    """Hierarchical prior over the weights of ``net``, shared by many tasks.

    Parameters
    ----------
    net : nn.Module
        Backbone; its parameters are the prior means μ. Forward must accept task-batched
        weights through :func:`bayesmeta.nets.batched_forward`.
    likelihood : Likelihood
        ``Categorical()`` or ``Normal(...)``.
    prior_scale : float, mapping, "auto" or None
        Initial prior standard deviation σ of every weight, or of each weight tensor by name
        (every name of ``net.named_parameters()``; :func:`relative_prior_scale` gives each
        a share of its own initial size); ``"auto"`` (the default) is what the backbone
        declares (:meth:`~bayesmeta.nets.Backbone.default_prior_scale`: 0.1 for ``MLP`` and any
        other module; for ``Conv4`` a tenth of each body weight's initial RMS and 0.1 on the
        head); ``None`` makes the prior flat (improper, log density 0), as MAML assumes.
    learn_prior_scale : bool
        Meta-learn σ (default) or keep it fixed.
    hyperprior : Hyperprior, optional
        Adds ``log p(θ)`` to the model (and to the meta-objective).

    Examples
    --------
    >>> model = HierarchicalBNN(MLP(1, [40, 40], 1), Normal(noise=0.3))
    >>> f = model(x, y)   # a Pyro model: x [T, B, 1], y [T, B, 1]
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: Likelihood,
        prior_scale: float | Mapping[str, float] | str | None = "auto",
        learn_prior_scale: bool = True,
        hyperprior: Hyperprior | None = None,
    ):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if not isinstance(likelihood, Likelihood):
            raise TypeError(
                "likelihood must be a bayesmeta.models.Likelihood (Normal(), Categorical(), "
                "StudentT(), HeteroscedasticNormal(), Bernoulli() or a subclass of your own), "
                f"got {type(likelihood).__name__}"
            )
        scales = _check_scales(prior_scale, net)
        if hyperprior is not None and not isinstance(hyperprior, Hyperprior):
            raise TypeError(f"hyperprior must be a Hyperprior, got {type(hyperprior).__name__}")
        if hyperprior is not None and prior_scale is None:
            raise ValueError("hyperprior needs a finite prior_scale, got prior_scale=None")
        self.net = net
        self.likelihood = likelihood
        self.hyperprior = hyperprior
        self.names: list[str] = [name for name, _ in net.named_parameters()]
        if not self.names:
            raise ValueError("net must have parameters, found none")
        # Meta-parameters that a guide declares (Guide.hyperparameters), learned with θ.
        self.guide_params = nn.ParameterDict()
        self.flat = prior_scale is None
        if self.flat:
            self.scale_raw = None
        else:
            self.scale_raw = nn.ParameterList(
                nn.Parameter(
                    torch.full_like(p.detach(), _inv_softplus(scales[n])),
                    requires_grad=learn_prior_scale,
                )
                for n, p in net.named_parameters()
            )

    # θ, by weight name -------------------------------------------------------------
    def prior_loc(self) -> dict[str, torch.Tensor]:
        """μ: name → tensor of the parameter's shape."""
        return dict(self.net.named_parameters())

    def prior_scale_raw(self) -> dict[str, torch.Tensor] | None:
        """Unconstrained σ (``σ = softplus(raw)``), or ``None`` for a flat prior."""
        if self.scale_raw is None:
            return None
        return dict(zip(self.names, self.scale_raw, strict=True))

    def prior_scale(self) -> dict[str, torch.Tensor] | None:
        """σ: name → tensor of the parameter's shape, or ``None`` for a flat prior."""
        raw = self.prior_scale_raw()
        return None if raw is None else {k: F.softplus(v) for k, v in raw.items()}

    def add_guide_params(self, values: dict[str, torch.Tensor]) -> None:
        """Register a guide's meta-parameters (name → initial value) in :attr:`guide_params`;
        a name already there keeps its value (a learner rebuilt on a trained model)."""
        for name, value in values.items():
            if name not in self.guide_params:
                self.guide_params[name] = nn.Parameter(value.detach().clone())

    def shapes(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.net.named_parameters()}

    def theta(self) -> Iterator[nn.Parameter]:
        """The trainable global parameters θ (same as ``parameters()`` less frozen ones)."""
        return (p for p in self.parameters() if p.requires_grad)

    # densities ---------------------------------------------------------------------
    def prior(self, name: str, flat: bool = False) -> dist.TorchDistribution:
        """``p(w_name | θ)`` with batch shape ``[]`` and the parameter's shape as event."""
        loc = self.prior_loc()[name]
        scales = self.prior_scale()
        scale = torch.ones_like(loc) if scales is None else scales[name]
        d = dist.Normal(loc, scale).to_event(loc.dim())
        return d.mask(False) if (flat or self.flat) else d

    def hyperprior_log_prob(self) -> torch.Tensor:
        """``log p(θ)`` under the hyperprior (0 without one)."""
        if self.hyperprior is None:
            return torch.zeros(())
        hp = self.hyperprior
        total = torch.zeros(())
        for loc, scale in zip(self.prior_loc().values(), self.prior_scale().values(), strict=True):
            total = total + dist.Normal(0.0, hp.loc_scale).log_prob(loc).sum()
            precision = scale.pow(-2)
            total = total + dist.Gamma(hp.concentration, hp.rate).log_prob(precision).sum()
        return total

    def out_features(self, x: torch.Tensor) -> int:
        """Size of the network's last output axis for inputs like ``x [T, B, ...]``."""
        with torch.no_grad():
            w = {k: v.unsqueeze(0) for k, v in self.prior_loc().items()}
            return batched_forward(self.net, w, x[:1, :1]).shape[-1]

    # the Pyro model ----------------------------------------------------------------
    def model(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        flat_prior: bool = False,
        context: torch.Tensor | None = None,
        shared: Sequence[str] = (),
    ) -> torch.Tensor:
        """Pyro model of a meta-batch.

        Parameters
        ----------
        x : Tensor ``[T, B, ...]``
        y : Tensor ``[T, B]`` or ``[T, B, D]``, optional (``None`` samples it)
        flat_prior : bool
            Mask the prior of the task weights (MAML's improper flat prior).
        context : Tensor ``[T, S, ...]``, optional
            The tasks' support inputs, from which batch normalisation takes its statistics
            when ``x`` are queries (see :func:`bayesmeta.nets.batched_forward`); ``None``:
            ``x`` is its own context, as for the support set.
        shared : weight names that all tasks share (a method that does not adapt them, e.g.
            ANIL's body): their sites carry no prior, and a guide pins them at θ's mean.

        Returns
        -------
        Tensor ``[*lead, T, B, O]``: network outputs, ``lead = (P,)`` inside a particle plate.
        """
        T, B = x.shape[0], x.shape[1]
        # θ as Pyro parameters, so that Pyro's own inference (SVI, JitTrace_ELBO, Predictive)
        # sees and trains them; they stay the module's tensors.
        pyro.module("theta", self)
        weights = {}
        with pyro.plate("tasks", T, dim=-2):
            for name in self.names:
                prior = self.prior(name, flat=flat_prior or name in shared)
                event = len(prior.event_shape)
                site = pyro.sample(name, prior.expand([T, 1]))
                weights[name] = site.squeeze(-event - 1)
            f = batched_forward(self.net, weights, x, context=context)
            with pyro.plate("data", B, dim=-1):
                pyro.sample("obs", self.likelihood.distribution(f), obs=y)
        if self.hyperprior is not None:
            pyro.factor("hyperprior", self.hyperprior_log_prob())
        return f

    forward = model
