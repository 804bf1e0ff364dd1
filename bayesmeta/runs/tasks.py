"""The task families a run can name, each a registered spec: its defaults, its measured preset,
its task distributions and its model.

``bayesmeta train --task NAME`` and the benchmark suites read a family only through its spec
(:data:`RUN_TASKS`); a new family is one :class:`RunTask` subclass and
:func:`register_run_task`, with no branch on its name anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from bayesmeta import models, nets
from bayesmeta.data import Omniglot, RandomAffine, Sinusoid, packaged_omniglot_root
from bayesmeta.nets import _registry

__all__ = [
    "UsageError",
    "DATA_ROOT_ENV",
    "resolve_data_root",
    "RunTask",
    "RUN_TASKS",
    "register_run_task",
    "run_task",
]

DATA_ROOT_ENV = "BAYESMETA_DATA_ROOT"


class UsageError(Exception):
    """A user error in settings, data or a run folder: the CLI prints it as one line on
    stderr and exits with status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def resolve_data_root(arg: str | None) -> Path:
    """The Omniglot folder: ``--data-root``, else ``$BAYESMETA_DATA_ROOT``, else Lake's small
    background sets shipped with the package (:func:`bayesmeta.data.packaged_omniglot_root`)."""
    if arg:
        root = Path(arg)
        if not root.is_dir():
            raise UsageError(f"--data-root {root} is not a folder")
        return root.resolve()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        root = Path(env)
        if not root.is_dir():
            raise UsageError(f"${DATA_ROOT_ENV}={env} is not a folder")
        return root.resolve()
    try:
        return packaged_omniglot_root()
    except FileNotFoundError as err:
        raise UsageError(
            f"no Omniglot data found: --data-root not given, ${DATA_ROOT_ENV} unset, and {err}"
        ) from err


class RunTask:
    """A task family of runs. Subclasses set the class attributes and the three methods.

    Attributes
    ----------
    name : the ``--task`` value
    kind : the kind of its likelihood (``"regression"``, ``"classification"``), for reports
    defaults : its settings' defaults (:data:`bayesmeta.runs.DEFAULTS`)
    preset : the measured configuration a run that names no method gets
        (:data:`bayesmeta.runs.TASK_PRESETS`)
    needs_data : whether it reads a data folder (``data_root``)
    metric : the score its results lead with (a key of :func:`bayesmeta.evaluate`'s)
    classes : whether its tasks are ``N``-way classifications (so out-of-episode queries exist)
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    preset: ClassVar[dict[str, Any]] = {}
    needs_data: ClassVar[bool] = False
    metric: ClassVar[str] = ""
    classes: ClassVar[bool] = False

    def tasks(self, config: dict[str, Any], split: str) -> Any:
        """The task distribution of ``config`` for ``split`` (train/val/test)."""
        raise NotImplementedError

    def model(self, config: dict[str, Any]) -> tuple[nn.Module, models.Likelihood]:
        """A fresh network and likelihood for ``config`` (weights from the global RNG)."""
        raise NotImplementedError

    def backbone(self, hidden: str) -> str:
        """The network of width ``hidden`` (``--hidden`` form) in words, for reports."""
        raise NotImplementedError


#: The registered task families, by name (``bayesmeta train --task``'s choices).
RUN_TASKS: dict[str, RunTask] = {}


def register_run_task(cls: type[RunTask]) -> type[RunTask]:
    """Class decorator: runs and suites can name ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, RunTask)) or not cls.name:
        raise TypeError(f"register_run_task takes a RunTask subclass with a name, got {cls!r}")
    taken = {cls.name: type(RUN_TASKS[cls.name])} if cls.name in RUN_TASKS else {}
    _registry.add(taken, cls.name, cls, "run task")  # (the registries' one rule)
    RUN_TASKS[cls.name] = cls()
    return cls


def run_task(name: Any) -> RunTask:
    """The registered family ``name``, else :class:`UsageError` naming the choices."""
    if not isinstance(name, str) or name not in RUN_TASKS:
        raise UsageError(f"unknown task {name!r}; expected one of {tuple(RUN_TASKS)}")
    return RUN_TASKS[name]


def widths(text: str) -> list[int]:
    """``--hidden``'s widths: positive ints separated by commas."""
    try:
        found = [int(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        found = []
    if not found or any(w < 1 for w in found):
        raise UsageError(f"--hidden must be positive ints separated by commas, got {text!r}")
    return found


@register_run_task
class SinusoidRun(RunTask):
    """Finn et al.'s sinusoid regression, an MLP with a Normal likelihood."""

    name = "sinusoid"
    kind = "regression"
    metric = "mse"
    defaults = {
        "shots": 10,
        "queries": 10,
        "hidden": "40,40",
        "noise": 0.3,
        # By update rule: plain steps (measured in the likelihood's and the prior's curvature:
        # 1/30 is a step of 0.003 on the NLL per point at noise 0.3, the size the suites
        # measured), natural ones (scaled by the posterior's variance), and an exact guide's
        # Newton steps (1: full steps). Another rule takes its own default.
        "inner_lr": {"gradient": 1 / 30, "natural": 0.1, "newton": 1.0},
        "meta_batch": 25,
        "prior_scale": 0.1,
    }
    # Lowest NLL and MSE on sinusoids, 90% coverage in range; about 40 s.
    preset = {"method": "bayes-head", "meta_steps": 4000, "meta_lr": 3e-3}

    def tasks(self, config, split):
        try:
            return Sinusoid(config["shots"], config["queries"], noise=config["noise"])
        except (ValueError, TypeError) as err:
            raise UsageError(f"cannot make sinusoid tasks: {err}") from err

    def model(self, config):
        net = nets.MLP(1, widths(config["hidden"]), 1)
        return net, models.Normal(noise=config["noise"])

    def backbone(self, hidden):
        return f"MLP {hidden}"


@register_run_task
class OmniglotRun(RunTask):
    """N-way K-shot Omniglot (the packaged sets, or any data root), a Conv4 classifier."""

    name = "omniglot"
    kind = "classification"
    metric = "accuracy"
    classes = True
    needs_data = True
    defaults = {
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "hidden": "32",
        "image_size": 28,
        # 0.4 (Finn et al.); under θ's prior the step is preconditioned by its pull.
        "inner_lr": {"gradient": 0.4, "natural": 0.5, "newton": 1.0},
        "meta_batch": 16,
        # A tenth of each weight tensor's initial RMS (bayesmeta.models.relative_prior_scale):
        # Conv4 normalises its activations, and σ = 0.1 on its small conv weights made bayes's
        # draws noise (docs/methods.md, "bayes").
        "prior_scale": "relative",
        # Start the classifier at zero (see Conv4): labels are permuted in every task.
        "zero_head": True,
        # Distort meta-training images at random (bayesmeta.data.RandomAffine).
        "augment": True,
        # Conv4's normalisation (batch statistics from the support set, or layer norm).
        "norm": "batch",
    }
    # Highest 5-way accuracy and lowest NLL on Omniglot; about 3.5 minutes.
    preset = {
        "method": "bayes-proto",
        "meta_steps": 800,
        "meta_batch": 8,
        "queries": 5,
        "meta_lr": 6e-3,
        "lr_schedule": "cosine",
    }

    def tasks(self, config, split):
        root = resolve_data_root(config.get("data_root"))
        try:
            tasks = Omniglot(
                root,
                config["ways"],
                config["shots"],
                config["queries"],
                split=split,
                image_size=config["image_size"],
            )
        except (ValueError, FileNotFoundError, OSError) as err:
            raise UsageError(f"cannot read Omniglot from data root {root}: {err}") from err
        # Runs saved before the key existed have none: they trained on the images as they are.
        return RandomAffine(tasks) if split == "train" and config.get("augment") else tasks

    def model(self, config):
        found = widths(config["hidden"])
        if len(found) != 1:
            raise UsageError(
                f"--hidden for omniglot is one channel count, got {config['hidden']!r}"
            )
        net = nets.Conv4(
            config.get("in_channels") or 1,
            config["ways"],
            hidden=found[0],
            image_size=config["image_size"],
            zero_head=bool(config.get("zero_head")),
            norm=config.get("norm") or "batch",
        )
        return net, models.Categorical()

    def backbone(self, hidden):
        return f"Conv4-{hidden}"
