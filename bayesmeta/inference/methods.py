"""The meta-learners as configurations of the one inner loop.

Each method is a :class:`Method`: which guide adapts, whether the prior is flat, whether the
inner graph is cut, whether the step sizes are learned, which weights adapt, and how θ moves.

============  ======  =====  ===========  ==========  =====  =======
method        guide   prior  first order  learned lr  adapt  outer
============  ======  =====  ===========  ==========  =====  =======
``bayes``     Normal  θ      no           no          all    ELBO
``maml``      Delta   flat   no           no          all    query
``fomaml``    Delta   flat   yes          no          all    query
``reptile``   Delta   flat   yes          no          all    Reptile
``metasgd``   Delta   flat   no           yes         all    query
``anil``      Delta   flat   no           no          head   query
``map``       Delta   θ      no           no          all    ELBO
============  ======  =====  ===========  ==========  =====  =======

``outer="elbo"`` minimises the query negative log predictive plus ``β·KL(q_t ‖ p(w|θ))/S``
(zero under a flat prior, so with a Delta guide and one particle it is MAML's query loss);
``"reptile"`` moves μ by ``ε·mean_t(w_t − μ)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bayesmeta.models import DeltaGuide, Guide, NormalGuide

__all__ = ["Method", "METHODS", "resolve_method"]

_GUIDES = {"normal": NormalGuide, "delta": DeltaGuide}


@dataclass(frozen=True)
class Method:
    """One configuration of the inner and outer loop."""

    name: str
    guide: str = "delta"  # "normal" | "delta"
    flat_prior: bool = True
    first_order: bool = False
    learn_inner_lr: bool = False
    adapt: str = "all"  # "all" | "head"
    outer: str = "elbo"  # "elbo" | "reptile"

    def make_guide(self) -> Guide:
        return _GUIDES[self.guide]()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("bayes", guide="normal", flat_prior=False),
        Method("maml"),
        Method("fomaml", first_order=True),
        Method("reptile", first_order=True, outer="reptile"),
        Method("metasgd", learn_inner_lr=True),
        Method("anil", adapt="head"),
        Method("map", flat_prior=False),
    )
}


def resolve_method(name: str, **overrides) -> Method:
    """The named method with some fields replaced (``None`` values are ignored)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "guide" in overrides and overrides["guide"] not in _GUIDES:
        raise ValueError(f"guide must be one of {sorted(_GUIDES)}, got {overrides['guide']!r}")
    if "adapt" in overrides and overrides["adapt"] not in ("all", "head"):
        raise ValueError(f"adapt must be 'all' or 'head', got {overrides['adapt']!r}")
    return replace(METHODS[name], **overrides)
