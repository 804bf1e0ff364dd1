"""Observation models p(y | f(x; w)) for the hierarchical BNN.

Network outputs ``f`` carry the leading axes of the weights they came from, ``[*lead, T, B, O]``
with ``lead`` empty or ``(P,)``; targets carry the task axis first, ``[T, B]`` (class labels),
``[T, B, D]`` (real targets) or ``[T, B, L]`` (0/1 labels of a multi-label task).

A likelihood of your own subclasses :class:`Likelihood`: ``kind``, :meth:`~Likelihood.distribution`,
:meth:`~Likelihood.log_prob` and :meth:`~Likelihood.check_targets` are required; predictions,
``evaluate`` and the ArviZ export use :meth:`~Likelihood.mean_var` and
:meth:`~Likelihood.sample`, which have defaults built on the distribution; :meth:`~Likelihood.spec`
lets a saved learner rebuild it without pickled code.
"""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from bayesmeta.models.draws import categorical, standard_normal
from bayesmeta.models.predictive import (
    BinaryPredictive,
    GaussianPredictive,
    LabelPredictive,
    Predictive,
    RealPredictive,
)
from bayesmeta.nets import _registry

__all__ = [
    "Likelihood",
    "Categorical",
    "Normal",
    "StudentT",
    "HeteroscedasticNormal",
    "Bernoulli",
    "LIKELIHOODS",
    "register_likelihood",
]


#: The likelihoods a saved learner names by class, rebuilt as ``cls(**spec())``:
#: :func:`register_likelihood` adds one; another is rebuilt from the model given at load.
LIKELIHOODS: dict[str, type[Likelihood]] = {}


def register_likelihood(cls: type[Likelihood]) -> type[Likelihood]:
    """Class decorator: learners saved with a ``cls`` likelihood rebuild it on load from its
    name and :meth:`Likelihood.spec`, without being given the model."""
    if not (isinstance(cls, type) and issubclass(cls, Likelihood)):
        raise TypeError(f"register_likelihood takes a Likelihood subclass, got {cls!r}")
    return _registry.add(LIKELIHOODS, cls.__name__, cls, "likelihood")


class Likelihood(nn.Module):
    """Base class: a likelihood knows its Pyro distribution and its pointwise log density."""

    #: ``"classification"`` (one label of N), ``"regression"`` (real targets) or
    #: ``"multilabel"`` (independent 0/1 labels): the name reports and results give it
    kind: str = ""

    #: The statistics and scores of its posterior predictive. A subclass that names none gets
    #: its kind's: :class:`LabelPredictive` (classification), :class:`BinaryPredictive`
    #: (multilabel), else :class:`RealPredictive` (from :meth:`mean_var` and :meth:`sample`).
    predictive: Predictive = RealPredictive()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.predictive is Likelihood.predictive:  # (named by no class down to Likelihood)
            by_kind = {"classification": LabelPredictive, "multilabel": BinaryPredictive}
            cls.predictive = by_kind.get(cls.kind, RealPredictive)()

    def target_size(self, out_features: int) -> int:
        """``D``, the size of a target's last axis, for ``out_features`` network outputs."""
        return out_features

    def mean_var(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``p(y | f)`` per target entry, each ``[*lead, T, B, D]``
        (regression; the predictive mixes them over particles)."""
        d = self.distribution(f)
        while isinstance(d, dist.Independent):
            d = d.base_dist
        return d.mean, d.variance

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``y`` for every output ``f``: ``[*lead, T, B]`` labels or
        ``[*lead, T, B, D]`` values. The default seeds torch's global generator from
        ``generator`` for the draw and restores it after."""
        if generator is None:
            return self.distribution(f).sample()
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        cuda = f.device.type == "cuda"
        with torch.random.fork_rng(devices=[f.device] if cuda else []):
            # Only the generator the draw uses is seeded (torch.manual_seed would reseed
            # every CUDA device too), and fork_rng restores it.
            index = f.device.index if f.device.index is not None else 0
            device_generator = torch.cuda.default_generators[index] if cuda else None
            (device_generator or torch.random.default_generator).manual_seed(seed)
            return self.distribution(f).sample()

    def spec(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this likelihood (JSON values)."""
        return {}

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        """Pyro distribution with batch shape ``[*lead, T, B]`` for outputs ``f``."""
        raise NotImplementedError

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y | f)`` of shape ``[*lead, T, B]``."""
        raise NotImplementedError

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        """Raise ``ValueError`` when targets ``y`` cannot be scored against ``out_features``."""
        raise NotImplementedError

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor | None:
        """Diagonal of the Fisher information of ``p(y | f)`` in ``f``, shaped like ``f``
        (the Gauss-Newton curvature per output); ``None`` where it is not written out."""
        return None

    def step_scale(self) -> float:
        """The unit of plain inner steps: the inverse of the output's Fisher information per
        point (``σ²`` for a Normal). Gradient steps on the support NLL are multiplied by it,
        so that a step size means the same at any noise level: on a Normal likelihood,
        ``inner_lr`` is the step on half the mean squared error. ``1`` for a likelihood
        whose curvature does not scale with a parameter (labels)."""
        return 1.0


@register_likelihood
class Categorical(Likelihood):
    """``y ~ Categorical(logits=f)`` for ``N``-way classification; ``f`` is ``[..., B, N]``."""

    kind = "classification"
    predictive = LabelPredictive()

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=f)

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(f, -1)
        return p * (1 - p)

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return categorical(torch.softmax(f, -1), generator)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(f, dim=-1)
        index = y.expand(logp.shape[:-1]).unsqueeze(-1)
        return logp.gather(-1, index).squeeze(-1)

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(
                f"{name}: the Categorical likelihood expects integer class labels [T, B], "
                f"got dtype {y.dtype}; use Normal() for real-valued targets"
            )
        if y.dim() != 2:
            raise ValueError(f"{name}: class labels must have shape [T, B], got {tuple(y.shape)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out_features:
            raise ValueError(
                f"{name}: labels must lie in [0, {out_features}) to match the network's "
                f"{out_features} outputs, found range [{lo}, {hi}]"
            )


@register_likelihood
class Normal(Likelihood):
    """``y ~ Normal(f, noise)`` with ``y`` of shape ``[T, B, D]``.

    Parameters
    ----------
    noise : float
        Observation standard deviation (its initial value when learned).
    learn_noise : bool
        Meta-learn ``log(noise)`` as one of the global parameters θ.
    """

    kind = "regression"
    predictive = GaussianPredictive()

    def __init__(self, noise: float = 1.0, learn_noise: bool = False):
        super().__init__()
        self.learn_noise = bool(learn_noise)
        self._fixed_noise = None if self.learn_noise else _positive("noise", noise)
        _register_log(self, "log_noise", _positive("noise", noise), self.learn_noise)

    @property
    def noise(self) -> torch.Tensor:
        return self.log_noise.exp()

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        return (-2 * self.log_noise).exp().to(f.dtype).expand_as(f)

    def step_scale(self) -> float:
        # A fixed noise as given, not its float32 log: a step size of 1/30 at noise 0.3 is then
        # 0.003 to the bit, and a learner's numbers do not hang on the rounding of the log.
        if self._fixed_noise is not None:
            return self._fixed_noise**2
        return float((2 * self.log_noise.detach()).exp())

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(f, self.noise.to(f.dtype)).to_event(1)

    def mean_var(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f, self.noise.to(f.dtype).square().expand_as(f)

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return f + self.noise.to(f.dtype) * standard_normal(f.shape, f, generator)

    def spec(self) -> dict[str, Any]:
        noise = self._fixed_noise if self._fixed_noise is not None else float(self.noise.detach())
        return {"noise": noise, "learn_noise": self.learn_noise}

    def log_prob(
        self, f: torch.Tensor, y: torch.Tensor, output_var: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pointwise ``log p(y | f)`` ``[*lead, T, B]``; with ``output_var`` (the variance of a
        Gaussian ``f``, broadcastable to it) the marginal ``log N(y; f, noise² + output_var)``."""
        log_noise = self.log_noise.to(f.dtype)
        if output_var is not None:
            var = (2 * log_noise).exp() + output_var
            z2 = (y - f).square() / var
            return (-0.5 * (z2 + var.log() + math.log(2 * math.pi))).sum(-1)
        # (From the log-scale directly: the inner loop calls this at every step.)
        z = (y - f) * (-log_noise).exp()
        return (-0.5 * z.square()).sum(-1) - z.shape[-1] * (log_noise + 0.5 * math.log(2 * math.pi))

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if not y.is_floating_point():
            raise ValueError(
                f"{name}: the Normal likelihood expects real targets [T, B, D], got dtype "
                f"{y.dtype}; use Categorical() for class labels"
            )
        if y.dim() != 3 or y.shape[-1] != out_features:
            raise ValueError(
                f"{name}: targets must have shape [T, B, {out_features}] to match the network's "
                f"outputs, got {tuple(y.shape)}"
            )

    def extra_repr(self) -> str:
        return f"noise={float(self.noise.detach()):.4g}, learn_noise={self.learn_noise}"


def _check_real_targets(y: torch.Tensor, width: int, name: str, what: str) -> None:
    if not y.is_floating_point():
        raise ValueError(
            f"{name}: the {what} likelihood expects real targets [T, B, D], got dtype {y.dtype}"
        )
    if y.dim() != 3 or y.shape[-1] != width:
        raise ValueError(f"{name}: targets must have shape [T, B, {width}], got {tuple(y.shape)}")


def _register_log(module: nn.Module, name: str, value: float, learn: bool) -> None:
    """``log(value)`` as ``module.<name>``: a parameter of θ when ``learn``, else a buffer (so
    that it moves with the module's device and dtype either way)."""
    log = torch.tensor(math.log(value))
    if learn:
        setattr(module, name, nn.Parameter(log))
    else:
        module.register_buffer(name, log)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


@register_likelihood
class StudentT(Likelihood):
    """``y ~ StudentT(df, loc=f, scale)``: heavy-tailed regression, robust to outliers.

    Parameters
    ----------
    df : float
        Degrees of freedom, > 2 (the predictive's variance, which its scores need, is finite
        only there).
    scale : float
        Scale (its initial value when learned).
    learn_scale : bool
        Meta-learn ``log(scale)`` as one of the global parameters θ.
    """

    kind = "regression"

    def __init__(self, df: float = 4.0, scale: float = 1.0, learn_scale: bool = False):
        super().__init__()
        self.df = _positive("df", df)
        if self.df <= 2:
            raise ValueError(
                f"df must be > 2, so that predictions have a variance (their entropy, mutual "
                f"information and intervals need it), got {df!r}"
            )
        self.init_scale = _positive("scale", scale)
        self.learn_scale = bool(learn_scale)
        _register_log(self, "log_scale", self.init_scale, self.learn_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.StudentT(self.df, f, self.scale.to(f.dtype)).to_event(1)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dist.StudentT(self.df, f, self.scale.to(f.dtype)).log_prob(y).sum(-1)

    def mean_var(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        var = self.scale.to(f.dtype).square() * self.df / (self.df - 2)
        return f, var.expand_as(f)

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        # Fisher information of a Student-t's location: (df + 1) / ((df + 3) scale²).
        info = (self.df + 1) / ((self.df + 3) * self.scale.to(f.dtype).square())
        return info.expand_as(f)

    def step_scale(self) -> float:
        return float((self.df + 3) * self.scale.detach().square() / (self.df + 1))

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        _check_real_targets(y, out_features, name, "StudentT")

    def spec(self) -> dict[str, Any]:
        return {"df": self.df, "scale": self.init_scale, "learn_scale": self.learn_scale}

    def extra_repr(self) -> str:
        return f"df={self.df:g}, scale={float(self.scale.detach()):.4g}"


@register_likelihood
class HeteroscedasticNormal(Likelihood):
    """``y ~ Normal(f[..., :D], softplus(f[..., D:]) + min_scale)``: the network predicts each
    target's noise too, so it has ``O = 2D`` outputs for ``D`` targets.

    Parameters
    ----------
    min_scale : float
        Floor of the predicted standard deviation, in the targets' units. It bounds the
        likelihood's curvature (residual² / scale²): with wide weight posteriors a floor far
        below the data's noise lets draws predict a tiny scale, and the inner loop diverges
        (sinusoid targets, prior σ 0.5: diverged at 1e-3, trained at 0.1).
    """

    kind = "regression"

    def __init__(self, min_scale: float = 1e-3):
        super().__init__()
        self.min_scale = _positive("min_scale", min_scale)

    def target_size(self, out_features: int) -> int:
        return out_features // 2

    def _loc_scale(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = f.chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(*self._loc_scale(f)).to_event(1)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loc, scale = self._loc_scale(f)
        z = (y - loc) / scale
        return (-0.5 * z.square() - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean_var(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self._loc_scale(f)
        return loc, scale.square()

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        loc, scale = self._loc_scale(f)
        return loc + scale * standard_normal(loc.shape, loc, generator)

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if out_features % 2:
            raise ValueError(
                f"{name}: HeteroscedasticNormal needs 2 network outputs per target (a mean and a "
                f"scale), but the network has {out_features}"
            )
        _check_real_targets(y, out_features // 2, name, "HeteroscedasticNormal")

    def spec(self) -> dict[str, Any]:
        return {"min_scale": self.min_scale}


@register_likelihood
class Bernoulli(Likelihood):
    """``y_l ~ Bernoulli(sigmoid(f_l))`` independently per label: multi-label classification
    with ``O = L`` outputs and 0/1 targets ``[T, B, L]`` (float or int)."""

    kind = "multilabel"
    predictive = BinaryPredictive()

    def distribution(self, f: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=f).to_event(1)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(f.dtype)
        return -F.binary_cross_entropy_with_logits(f, y.expand_as(f), reduction="none").sum(-1)

    def output_fisher(self, f: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(f)
        return p * (1 - p)

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = torch.sigmoid(f)
        u = torch.rand(
            p.shape, generator=generator, device=p.device if generator is None else generator.device
        )
        return (u.to(p.device) < p).to(p.dtype)

    def check_targets(self, y: torch.Tensor, out_features: int, name: str = "y") -> None:
        if y.dim() != 3 or y.shape[-1] != out_features:
            raise ValueError(
                f"{name}: multi-label targets must have shape [T, B, {out_features}], got "
                f"{tuple(y.shape)}"
            )
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"{name}: the Bernoulli likelihood expects 0/1 labels")
