"""The learner's file format: its configuration, what a file holds, and rebuilding from one.

A learner file and a checkpoint of :func:`bayesmeta.inference.training.fit` are one format
(:func:`payload`), written atomically and read without unpickling code
(:mod:`bayesmeta.inference.checkpoint`): the configuration as JSON (:func:`config`, with the
model's spec), θ, Meta-SGD's step sizes, the optimizer's state, the step counters, the history
and, in a checkpoint, the run's settings and its task sampler's state. :func:`resume` continues a
run from a checkpoint only if the checkpoint was written by the same method, model and settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bayesmeta.inference._checks import callable_name
from bayesmeta.inference._resume import resume_differences
from bayesmeta.inference.checkpoint import load_checkpoint, save_checkpoint
from bayesmeta.inference.methods import resolve_method
from bayesmeta.inference.protocol import Learner
from bayesmeta.inference.spec import (
    check_keys,
    constructor_arguments,
    model_from_spec,
    model_spec,
)
from bayesmeta.models import GUIDES, HierarchicalBNN

__all__ = ["config", "payload", "restore", "save", "load", "resume"]


def config(learner: Learner) -> dict[str, Any]:
    """JSON-able description that, with the state, rebuilds ``learner``."""
    m = learner.method
    return {
        "model": model_spec(learner.model),
        "method": m.name,
        "guide": m.guide,
        "first_order": m.first_order,
        "adapt": m.adapt if isinstance(m.adapt, str) else list(m.adapt),
        "update": m.update if isinstance(m.update, str) else m.update.name,
        "flat_prior": m.flat_prior,
        "head_init": m.head_init,
        "inner_steps": learner.inner.steps,
        "inner_lr": learner.inner_lr,
        "particles": learner.inner.particles,
        "meta_lr": learner.meta_lr,
        "optimizer": learner.optimizer_name,
        "kl_weight": learner.kl_weight,
        "hyperprior_weight": learner.hyperprior_weight,
        "eval_particles": learner.eval_particles,
        "test_inner_steps": learner.test_inner_steps,
        "elbo": learner.inner.backend,
        "task_chunk": "auto" if learner.auto_chunk else learner.task_chunk,
        "transductive": learner.inner.transductive,
        "threads": learner.threads,
        # Meta-SGD's saved tensors are ρ of lr = inner_lr · exp(ρ) (older files: lr itself).
        "step_size_space": "log",
        # A custom inner objective is code: only its name is kept, to ask for it at load.
        "inner_loss": None if learner.inner.loss is None else callable_name(learner.inner.loss),
    }


def payload(
    learner: Learner,
    run: dict | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """What a file holds for ``learner``: with ``run`` (a fit's settings) and ``generator`` (its
    task sampler) a checkpoint, without them a learner file."""
    return {
        "config": json.dumps(learner.config()),
        "model": learner.model.state_dict(),
        "lr_params": [p.detach() for p in learner.lr_params],
        "optimizer": learner.optimizer.state_dict(),
        "step": learner.step,
        "skipped_steps": learner.skipped_steps,
        "history": json.dumps(learner.history),
        "run": json.dumps(run),
        "generator": generator.get_state() if generator is not None else torch.empty(0),
    }


def restore(learner: Learner, saved: dict) -> dict:
    """Load a :func:`payload` into ``learner`` (θ, step sizes, optimizer, counters, history);
    returns the run's settings and the task sampler's state it holds."""
    learner.model.load_state_dict(saved["model"])
    with torch.no_grad():
        for p, v in zip(learner.lr_params, saved["lr_params"], strict=True):
            p.copy_(v)
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.step = int(saved["step"])
    learner.skipped_steps = int(saved["skipped_steps"])
    learner.history = json.loads(saved["history"])
    return {"run": json.loads(saved["run"]), "generator": saved["generator"]}


def save(learner: Learner, path: str | Path) -> Path:
    """Write θ, the optimizer and the configuration to ``path`` atomically."""
    return save_checkpoint(path, payload(learner))


def load(
    cls: type[Learner],
    path: str | Path,
    model: HierarchicalBNN | None = None,
    /,
    **kwargs: Any,
) -> Learner:
    """Rebuild a saved learner of class ``cls`` (never unpickles code).

    ``model`` is needed only when the backbone is not one of bayesmeta's own; it must have
    the saved architecture. ``kwargs`` (e.g. ``device``) override the saved configuration.
    """
    saved = load_checkpoint(path)
    settings = json.loads(saved["config"])
    spec = settings.pop("model")
    space = settings.pop("step_size_space", None)
    if space != "log" and resolve_method(settings["method"]).learn_inner_lr:
        raise ValueError(
            f"{path} holds Meta-SGD step sizes in the old linear form; this version learns "
            "them in log space (lr = inner_lr * exp(rho)) and cannot read them: retrain"
        )
    loss_name = settings.pop("inner_loss", None)
    if loss_name is not None and kwargs.get("inner_loss") is None:
        raise ValueError(
            f"{path} was trained with the inner loss {loss_name!r}, which is code and not "
            "saved; pass it again: MetaLearner.load(path, inner_loss=...)"
        )
    if settings.get("guide") not in GUIDES and kwargs.get("guide") is None:
        raise ValueError(
            f"{path} was trained with the guide {settings.get('guide')!r}, which is code and "
            "not saved; pass it again, MetaLearner.load(path, guide=...), or register it "
            "first with bayesmeta.inference.register_guide"
        )
    if model is None:
        model = model_from_spec(spec)
    check_keys("learner", settings, constructor_arguments(cls)[0])
    settings.update(kwargs)
    learner = cls(model, **settings)
    restore(learner, saved)
    return learner


def resume(learner: Learner, ckpt: Path, run: dict[str, Any], generator: torch.Generator) -> None:
    """Continue the run a checkpoint holds, after checking that it is this fit's run: the
    same method, model and settings (else ``ValueError`` naming every difference)."""
    saved = load_checkpoint(ckpt)
    saved_run = json.loads(saved["run"])
    diffs = resume_differences(json.loads(saved["config"]), learner.config(), saved_run, run)
    if diffs:  # checked before restore touches θ, the optimizer or the step
        raise ValueError(
            f"checkpoint_dir holds a run of other settings than this fit: "
            f"{'; '.join(diffs)} (the checkpoint's run: {saved_run}); use another "
            "checkpoint_dir or the same settings"
        )
    generator.set_state(restore(learner, saved)["generator"])
