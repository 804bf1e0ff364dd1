"""Pyro models: the hierarchical prior over a backbone's weights, likelihoods and guides."""

from bayesmeta.models.classes import ClassGaussianGuide, class_prototypes
from bayesmeta.models.guides import DeltaGuide, Guide, NormalGuide, State
from bayesmeta.models.head import GaussianHeadGuide, PrototypeLaplaceGuide
from bayesmeta.models.hierarchical import HierarchicalBNN, Hyperprior
from bayesmeta.models.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    HeteroscedasticNormal,
    Likelihood,
    Normal,
    StudentT,
)
from bayesmeta.models.particles import ParticleGuide, rbf_kernel

__all__ = [
    "HierarchicalBNN",
    "Hyperprior",
    "Likelihood",
    "Categorical",
    "Normal",
    "StudentT",
    "HeteroscedasticNormal",
    "Bernoulli",
    "LIKELIHOODS",
    "Guide",
    "NormalGuide",
    "DeltaGuide",
    "GaussianHeadGuide",
    "ClassGaussianGuide",
    "class_prototypes",
    "PrototypeLaplaceGuide",
    "ParticleGuide",
    "rbf_kernel",
    "State",
]
