"""The meta-learners as configurations of the one inner loop.

Each method is a :class:`Method`: which guide adapts, whether the prior is flat, whether the
inner graph is cut, whether the step sizes are learned, which weights adapt, the inner steps'
update rule (:mod:`bayesmeta.inference.rules`), and how θ moves.

==============  =======  =====  ===========  ==========  =====  ========  =======
method          guide    prior  first order  learned lr  adapt  update    outer
==============  =======  =====  ===========  ==========  =====  ========  =======
``bayes``       Normal±  θ      no           no          all    natural   ELBO
``bayes-head``  auto     θ      no           no          head   natural   ELBO
``bmaml``       SVGD     flat   no           no          all    gradient  ELBO
``maml``        Delta    flat   no           no          all    gradient  query
``fomaml``      Delta    flat   yes          no          all    gradient  query
``reptile``     Delta    flat   yes          no          all    gradient  Reptile
``metasgd``     Delta    flat   no           yes         all    gradient  query
``anil``        Delta    flat   no           no          head   gradient  query
``map``         Delta    θ      no           no          all    gradient  ELBO
``bayes-proto`` class    flat   –            no          head   –         query
``protomaml``   Delta    flat   no           no          all    gradient  query
==============  =======  =====  ===========  ==========  =====  ========  =======

``Normal±`` is the mean-field Normal with antithetic draws, two per inner step
(:class:`~bayesmeta.models.AntitheticNormalGuide`). ``bayes`` and ``map`` centre a
classifier's head prior on each task's class prototypes (``head_init="auto"``: the prior mean
of ``head.weight_k`` is ``2c_k`` and of ``head.bias_k`` ``−‖c_k‖²`` in the body's features, and
the posterior starts there), so that a tight prior on the head does not pin every task to one
classifier.

``outer`` is an :class:`~bayesmeta.inference.outer.OuterRule`: ``QueryLoss`` minimises the
query negative log predictive plus ``β·KL(q_t ‖ p(w|θ))/Q`` (zero under a flat prior, so with a
Delta guide and one particle it is MAML's query loss); ``ReptileDirection`` moves μ by
``ε·mean_t(w_t − μ)``. Weights a method does not adapt are shared by
all tasks (θ's mean). ``bayes-head`` is Bayesian where the tasks differ, in the head on a
meta-learned body; its ``auto`` guide is the full-covariance Gaussian head fit by Newton steps
(:class:`~bayesmeta.models.GaussianHeadGuide`: exact under a Normal likelihood, the Laplace
approximation under a Categorical) where the network has a linear head, else the mean-field
Normal fit by SVI. ``bmaml`` (Yoon et al. 2018) moves ``M`` particles, drawn from the learned
Gaussian ``N(μ, σ)`` (the meta-learned initial particles), by Stein variational gradient descent
on the support likelihood (:class:`~bayesmeta.models.ParticleGuide`; a flat prior, as MAML's:
under the learned prior its pull ``lr/(σ²S)`` diverged once meta-training shrank σ); its outer
loss is the query log predictive of the particle ensemble (particles carry no KL).

``bayes-proto`` classifies by a conjugate class-conditional Gaussian head on a shared body
(:class:`~bayesmeta.models.ClassGaussianGuide`): each class mean's posterior and the query's
posterior predictive are exact, so there are no inner steps, and the body, the class-mean
prior (mean ``m``, strength ``κ``) and the within-class scales are meta-trained through the
query log predictive. Its prior is over the class means, not the network's weights (those are
shared, hence ``flat``), and nothing is approximated, so the meta-loss carries no KL.
``protomaml`` is maml whose head starts every task at the support set's class prototypes
``c_k`` in the body's features (Proto-MAML, Triantafillou et al. 2020: ``w_k = 2c_k``,
``b_k = −‖c_k‖²``, differentiable into the body): the point estimate with the same head
initialisation, for an honest comparison with ``bayes-proto``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bayesmeta.inference.outer import OUTER_RULES, OuterRule
from bayesmeta.inference.rules import UpdateRule, resolve_update_rule
from bayesmeta.models import GUIDES, Guide, HierarchicalBNN, LabelPredictive
from bayesmeta.nets import has_linear_head, head_parameter_names

__all__ = [
    "Method",
    "METHODS",
    "resolve_method",
    "check_method",
    "resolve_head_init",
    "adapted_names",
    "default_inner_lr",
    "EXACT_INNER_LR",
]


@dataclass(frozen=True)
class Method:
    """One configuration of the inner and outer loop."""

    name: str
    guide: str = "delta"  # a name of GUIDES, or "auto"
    flat_prior: bool = True
    first_order: bool = False
    learn_inner_lr: bool = False
    adapt: str | tuple[str, ...] = "all"  # "all" | "head" | weight names
    outer: OuterRule = OUTER_RULES["elbo"]  # how θ moves: the query loss, or Reptile's rule
    #: the inner steps' rule, a name of :data:`~bayesmeta.inference.rules.UPDATE_RULES` or an
    #: :class:`~bayesmeta.inference.rules.UpdateRule`
    update: str | UpdateRule = "gradient"
    #: where each task's head starts: ``"theta"`` (θ's), ``"prototypes"`` (Proto-MAML's; under
    #: a prior, the head's prior is centred there too) or ``"auto"`` (prototypes for a
    #: classifier with a linear head, else θ's: :func:`resolve_head_init`)
    head_init: str = "theta"
    #: the likelihood kinds it applies to (``Likelihood.kind``)
    kinds: tuple[str, ...] = ("regression", "classification", "multilabel")
    #: the outer step size when none is given; ``None`` takes the outer rule's
    #: (:attr:`~bayesmeta.inference.outer.OuterRule.meta_lr`), as does a learner given another
    #: update rule than the method's
    meta_lr: float | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "bayes",
            guide="normal-antithetic",
            flat_prior=False,
            update="natural",
            head_init="auto",
            # It meta-learns a prior mean and scale for every weight, and at Adam's 1e-3 it was
            # far from trained after 1000 sinusoid steps (docs/methods.md, "Its outer step").
            meta_lr=1e-2,
        ),
        Method(
            "bayes-head",
            guide="auto",
            flat_prior=False,
            adapt="head",
            update="natural",
        ),
        Method("bmaml", guide="particles"),
        Method("maml"),
        Method("fomaml", first_order=True),
        Method("reptile", first_order=True, outer=OUTER_RULES["reptile"]),
        Method("metasgd", learn_inner_lr=True),
        Method("anil", adapt="head"),
        Method("map", flat_prior=False, head_init="auto"),
        Method("bayes-proto", guide="class-gaussian", adapt="head", kinds=("classification",)),
        Method("protomaml", head_init="prototypes", kinds=("classification",)),
    )
}


#: The inner step size a learner takes when none is given to a guide that fits itself
#: (Newton steps): full steps. Other guides take their rule's
#: :attr:`~bayesmeta.inference.rules.UpdateRule.default_lr`. tests/inference/test_defaults.py
#: trains every method with these on the sinusoid MLP and on Omniglot's Conv4.
EXACT_INNER_LR = 1.0


def default_inner_lr(method: Method, guide: Guide) -> float:
    """The inner step size of ``method`` with ``guide`` when the user gives none."""
    if guide.exact:
        return EXACT_INNER_LR
    return resolve_update_rule(method.update).default_lr


#: What a head-only method becomes when every weight adapts (``adapt="all"`` refuses it).
_ALL_WEIGHTS_TWIN = {"bayes-head": "bayes", "anil": "maml"}


def resolve_method(name: str, **overrides) -> Method:
    """The named method with some fields replaced (``None`` values are ignored); another
    update rule than the method's also drops the method's own outer step (:attr:`Method.meta_lr`).

    ``adapt="all"`` is refused for a method that adapts only the head (``bayes-head``,
    ``anil``, ``bayes-proto``): it would be another method under this one's name. A list of
    weight names (a head that is not the net's last layer) is allowed.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    choices = sorted([*GUIDES, "auto"])
    if "guide" in overrides and overrides["guide"] not in choices:
        raise ValueError(f"guide must be one of {choices}, got {overrides['guide']!r}")
    if "update" in overrides:
        resolve_update_rule(overrides["update"])  # (refuses an unknown name)
    if "adapt" in overrides:
        adapt = overrides["adapt"]
        if isinstance(adapt, (list, tuple)) and adapt and all(isinstance(n, str) for n in adapt):
            overrides["adapt"] = tuple(adapt)
        elif adapt not in ("all", "head"):
            raise ValueError(
                f"adapt must be 'all', 'head' or a non-empty list of weight names, got {adapt!r}"
            )
        if adapt == "all" and METHODS[name].adapt == "head":
            twin = _ALL_WEIGHTS_TWIN.get(name)
            instead = f"use method={twin!r}" if twin else "choose a method that adapts them"
            raise ValueError(
                f"adapt='all' contradicts method {name!r}, which adapts only the network's head "
                f"(adapt='head', or a list of the head's weight names); to adapt every weight, "
                f"{instead}"
            )
    method = METHODS[name]
    rule = overrides.get("update")
    if (
        rule is not None
        and resolve_update_rule(rule).name != resolve_update_rule(method.update).name
    ):
        # A method's own outer step was measured with its own inner steps: bayes's 1e-2 with
        # natural ones (with von steps one of tests/inference/test_defaults.py's runs got worse).
        overrides["meta_lr"] = None
    return replace(method, **overrides)


def resolve_head_init(method: Method, model: HierarchicalBNN) -> Method:
    """``method`` with ``head_init="auto"`` made ``"prototypes"`` for a classifier with a linear
    head and ``"theta"`` otherwise. On Omniglot's Conv4 a whole-network prior lets a task's head
    move little from its prior mean in a few steps: centred at θ's head, ``map`` and ``bayes``
    stayed at chance for 30 meta-steps; centred at the prototypes they learned
    (tests/inference/test_defaults.py)."""
    if method.head_init != "auto":
        return method
    prototypes = has_linear_head(model.net) and _labels(model)
    return replace(method, head_init="prototypes" if prototypes else "theta")


def check_method(method: Method, model: HierarchicalBNN) -> None:
    """Refuse a method, or a head initialisation, that ``model`` cannot take."""
    kind = model.likelihood.kind
    if kind not in method.kinds:
        raise ValueError(
            f"method {method.name!r} applies to {' and '.join(method.kinds)} likelihoods, got "
            f"{type(model.likelihood).__name__} ({kind})"
        )
    if method.head_init == "theta":
        return
    if method.head_init != "prototypes":
        raise ValueError(
            f"head_init must be 'theta', 'prototypes' or 'auto', got {method.head_init!r}"
        )
    if not has_linear_head(model.net) or not _labels(model):
        raise ValueError(
            f"method {method.name!r} starts each task's head at its class prototypes, which "
            "needs a network with a linear head (MLP, Conv4) and a classification likelihood, "
            f"got {type(model.net).__name__} and {type(model.likelihood).__name__}"
        )


def _labels(model: HierarchicalBNN) -> bool:
    """Whether ``model``'s outputs are logits of one class label (prototypes need them)."""
    return isinstance(model.likelihood.predictive, LabelPredictive)


def adapted_names(adapt: str | tuple[str, ...], net) -> tuple[str, ...] | None:
    """The weight names ``adapt`` means for ``net`` (``None``: all of them).

    ``"head"`` is :func:`bayesmeta.nets.head_parameter_names`; a tuple names the weights
    itself (e.g. a head registered before the body), each checked against ``net``.
    """
    if adapt == "all":
        return None
    if adapt == "head":
        return tuple(head_parameter_names(net))
    known = [n for n, _ in net.named_parameters()]
    unknown = [n for n in adapt if n not in known]
    if unknown:
        raise ValueError(
            f"adapt names weights {unknown} that {type(net).__name__} does not have; its weights "
            f"are {known}"
        )
    return tuple(n for n in known if n in adapt)  # in the network's order
