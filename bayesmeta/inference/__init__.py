"""Inference: the one batched inner loop, the meta-learners built on it, evaluation."""

from bayesmeta.inference.checkpoint import load_checkpoint, save_checkpoint
from bayesmeta.inference.evaluate import evaluate
from bayesmeta.inference.inner import InnerConfig, inner_loop, neg_elbo
from bayesmeta.inference.learner import MetaLearner, NonFiniteLossError
from bayesmeta.inference.methods import METHODS, Method
from bayesmeta.inference.ooe import evaluate_out_of_episode, uncertainty_scores
from bayesmeta.inference.posterior import Prediction, TaskPosterior
from bayesmeta.inference.results import Evaluation
from bayesmeta.inference.rules import UPDATE_RULES, UpdateRule, register_update_rule
from bayesmeta.models import GUIDES, register_guide  # (beside Guide; named here for learners)

__all__ = [
    "MetaLearner",
    "NonFiniteLossError",
    "TaskPosterior",
    "Prediction",
    "evaluate",
    "Evaluation",
    "evaluate_out_of_episode",
    "uncertainty_scores",
    "InnerConfig",
    "inner_loop",
    "neg_elbo",
    "Method",
    "METHODS",
    "GUIDES",
    "register_guide",
    "UpdateRule",
    "UPDATE_RULES",
    "register_update_rule",
    "save_checkpoint",
    "load_checkpoint",
]
