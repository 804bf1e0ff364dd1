"""Pyro models: the hierarchical prior over a backbone's weights, likelihoods and guides."""

from bayesmeta.models.classes import ClassGaussianGuide, class_prototypes
from bayesmeta.models.guides import (
    GUIDES,
    AntitheticNormalGuide,
    DeltaGuide,
    Guide,
    LocalNormalGuide,
    NormalGuide,
    Prior,
    State,
    guide_name,
    register_guide,
)
from bayesmeta.models.head import GaussianHeadGuide, PrototypeLaplaceGuide
from bayesmeta.models.hierarchical import HierarchicalBNN, Hyperprior, relative_prior_scale
from bayesmeta.models.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    HeteroscedasticNormal,
    Likelihood,
    Normal,
    StudentT,
    register_likelihood,
)
from bayesmeta.models.particles import ParticleGuide, rbf_kernel
from bayesmeta.models.predictive import (
    BinaryPredictive,
    GaussianPredictive,
    LabelPredictive,
    Predictive,
    RealPredictive,
)

__all__ = [
    "HierarchicalBNN",
    "Hyperprior",
    "relative_prior_scale",
    "Likelihood",
    "Categorical",
    "Normal",
    "StudentT",
    "HeteroscedasticNormal",
    "Bernoulli",
    "LIKELIHOODS",
    "register_likelihood",
    "Predictive",
    "LabelPredictive",
    "BinaryPredictive",
    "RealPredictive",
    "GaussianPredictive",
    "Guide",
    "GUIDES",
    "register_guide",
    "guide_name",
    "NormalGuide",
    "AntitheticNormalGuide",
    "LocalNormalGuide",
    "DeltaGuide",
    "GaussianHeadGuide",
    "ClassGaussianGuide",
    "class_prototypes",
    "PrototypeLaplaceGuide",
    "ParticleGuide",
    "rbf_kernel",
    "State",
    "Prior",
]
