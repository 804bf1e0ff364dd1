"""Run settings: every default of a run, and its learner and tasks built from a configuration.

A configuration is a flat JSON dict (a run folder's ``config.json``, a suite row's settings);
:func:`default_config` completes one, :func:`make_tasks` and :func:`make_learner` build from
it, :func:`check_config` and :func:`load_run` read a saved one back. ``bayesmeta.cli`` and
``bayesmeta.bench`` both stand on this module; neither defines a default of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

import bayesmeta as bm
from bayesmeta.inference import METHODS
from bayesmeta.inference._checks import check_device as _check_device
from bayesmeta.inference.checkpoint import atomic_write
from bayesmeta.inference.distributed import local_device
from bayesmeta.inference.rules import resolve_update_rule
from bayesmeta.inference.training import CHECKPOINT_NAME
from bayesmeta.runs.tasks import (
    DATA_ROOT_ENV,
    RUN_TASKS,
    RunTask,
    UsageError,
    register_run_task,
    resolve_data_root,
    run_task,
)

__all__ = [
    "UsageError",
    "TASKS",
    "DEFAULTS",
    "CONFIG_NAME",
    "LEARNER_NAME",
    "CHECKPOINT_NAME",
    "HISTORY_NAME",
    "DATA_ROOT_ENV",
    "GENERAL_DEFAULTS",
    "default_config",
    "option_tasks",
    "default_inner_lr",
    "TASK_PRESETS",
    "RunTask",
    "RUN_TASKS",
    "register_run_task",
    "resolve_data_root",
    "make_tasks",
    "make_learner",
    "load_run",
    "check_config",
    "check_device",
    "write_json",
    "write_text",
]

CONFIG_NAME = "config.json"
LEARNER_NAME = "learner.pt"
HISTORY_NAME = "history.json"

#: The shipped tasks' names (a task registered later is in :data:`RUN_TASKS`).
TASKS = tuple(RUN_TASKS)


class _PerTask(Mapping):
    """One attribute of every registered task, by name, read when asked."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def __getitem__(self, name: str) -> Any:
        return getattr(RUN_TASKS[name], self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(RUN_TASKS)

    def __len__(self) -> int:
        return len(RUN_TASKS)


#: Defaults of ``bayesmeta train`` that do not depend on the task.
GENERAL_DEFAULTS: dict[str, Any] = {
    "task": "sinusoid",
    "method": "bayes",  # where the task's preset (TASK_PRESETS) does not name one
    "meta_steps": 1000,
    "inner_steps": 5,
    "particles": None,
    "meta_lr": None,
    "lr_schedule": "constant",
    "seed": 0,
    "checkpoint_every": 100,
    "val_every": 100,
    "val_tasks": 100,
    "device": None,
    # Queries are normalised with their support set's statistics, never their own batch's.
    "transductive": False,
}

#: Per-task defaults of ``bayesmeta train`` (Finn et al. 2017 where they apply), by task: each
#: registered task's :attr:`~bayesmeta.runs.tasks.RunTask.defaults`.
DEFAULTS: Mapping[str, dict[str, Any]] = _PerTask("defaults")


def option_tasks(key: str) -> tuple[str, ...]:
    """The tasks whose runs take setting ``key``: those whose defaults name it (``data_root``:
    those that read a data folder), or every registered task for a general setting or one
    that no task's defaults name."""
    owners = tuple(
        name
        for name, task in RUN_TASKS.items()
        if key in task.defaults or (key == "data_root" and task.needs_data)
    )
    return tuple(RUN_TASKS) if key in GENERAL_DEFAULTS or not owners else owners


def default_inner_lr(task: str, method: str, update: str | None = None) -> float:
    """The per-task default inner step size of ``method`` (``update`` overrides its steps'
    rule)."""
    lr = DEFAULTS[task]["inner_lr"]
    spec = METHODS.get(method)
    if spec is None:
        return lr["gradient"]
    if spec.guide == "auto":
        return lr["newton"]
    rule = resolve_update_rule(spec.update if update is None else update)
    return lr.get(rule.name, rule.default_lr)


#: The best configuration the quick suite measured for each task (docs/methods.md; its
#: budget's time on a 2-core CPU): a run that names no ``--method`` gets it, and any of its
#: settings can still be given. Each registered task's
#: :attr:`~bayesmeta.runs.tasks.RunTask.preset`.
TASK_PRESETS: Mapping[str, dict[str, Any]] = _PerTask("preset")


def default_config(given: dict[str, Any]) -> dict[str, Any]:
    """A complete run configuration: ``given`` over the task's and the general defaults.

    The inner step size defaults per method (:func:`default_inner_lr`); for Omniglot the data
    root is resolved (:func:`resolve_data_root`). Every key of either task's defaults is present
    (``None`` where it does not apply).
    """
    task = run_task(given.get("task", GENERAL_DEFAULTS["task"]))
    preset = task.preset if given.get("method") is None else {}
    config = {**GENERAL_DEFAULTS, **task.defaults, **preset, **given}
    if "inner_lr" not in given:
        config["inner_lr"] = default_inner_lr(task.name, config["method"], config.get("update"))
    if task.needs_data:
        config["data_root"] = str(resolve_data_root(given.get("data_root")))
    for key in set().union(*(t.defaults for t in RUN_TASKS.values())):
        config.setdefault(key, None)
    config.setdefault("data_root", None)
    return config


def make_tasks(config: dict[str, Any], split: str):
    """The task distribution of a run's configuration (``split``: train/val/test); Omniglot's
    train split is distorted at random when ``config["augment"]``."""
    return run_task(config["task"]).tasks(config, split)


#: Optional ``MetaLearner`` settings a configuration may carry (absent or ``None``: the default).
_LEARNER_OPTIONS = (
    "kl_weight",
    "eval_particles",
    "test_inner_steps",
    "update",
    "guide",
    "adapt",
    "flat_prior",
)


def make_learner(config: dict[str, Any]) -> bm.MetaLearner:
    """A fresh learner for a run's configuration.

    The backbone's initial weights are drawn from a torch generator seeded with
    ``config["seed"]`` (default 0), so one configuration always starts from the same θ; the
    global RNG's state is left as it was. Besides the keys of :func:`default_config`, ``config``
    may set ``kl_weight``, ``eval_particles``, ``test_inner_steps``, ``update``, ``guide`` (a
    registered guide's name), ``adapt``, ``flat_prior`` (passed to :class:`bayesmeta.MetaLearner`)
    and ``in_channels`` (of the Conv4; default 1).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.get("seed") or 0)
        try:
            return _make_learner(config)
        except (ValueError, TypeError) as err:  # e.g. --image-size 3, from the Conv4
            raise UsageError(str(err)) from err


def _make_learner(config: dict[str, Any]) -> bm.MetaLearner:
    net, likelihood = run_task(config["task"]).model(config)
    options = {k: config[k] for k in _LEARNER_OPTIONS if config.get(k) is not None}
    scale = config["prior_scale"]
    if scale == "relative":
        scale = bm.models.relative_prior_scale(net)
    model = bm.models.HierarchicalBNN(net, likelihood, prior_scale=scale)
    device = local_device(config.get("device"))
    if not str(device).startswith("cuda"):
        # Runs opt in to the allocator that lets "auto" chunks take one task per pass.
        bm.nets.keep_freed_memory()
    return bm.MetaLearner(
        model,
        method=config["method"],
        inner_steps=config["inner_steps"],
        inner_lr=config["inner_lr"],
        particles=config["particles"],
        meta_lr=config["meta_lr"],
        device=device,
        transductive=bool(config.get("transductive")),
        **options,
    )


class PriorScale:
    """The type of the ``prior_scale`` setting: a number, or ``"relative"``."""


#: The JSON type of each setting a run's ``config.json`` may hold (``float``: any number).
_SETTING_TYPES: dict[str, type] = {
    **dict.fromkeys(
        (
            "task",
            "method",
            "lr_schedule",
            "hidden",
            "norm",
            "data_root",
            "device",
            "adapt",
            "update",
            "guide",
        ),
        str,
    ),
    **dict.fromkeys(("inner_lr", "meta_lr", "noise", "kl_weight"), float),
    "prior_scale": PriorScale,
    **dict.fromkeys(("transductive", "augment", "zero_head", "flat_prior"), bool),
    **dict.fromkeys(
        (
            "meta_steps",
            "meta_batch",
            "inner_steps",
            "particles",
            "ways",
            "shots",
            "queries",
            "image_size",
            "val_every",
            "val_tasks",
            "checkpoint_every",
            "seed",
            "eval_particles",
            "test_inner_steps",
            "in_channels",
            "world_size",
        ),
        int,
    ),
}
#: Settings that a saved configuration may lack (options of :func:`make_learner` among them).
_OPTIONAL_SETTINGS = {
    *_LEARNER_OPTIONS,
    "zero_head",
    "augment",
    "norm",
    "device",
    "data_root",
    "in_channels",
    "world_size",
}


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # (a bool is an int to Python, never to a configuration)
        return kind is bool
    if kind is PriorScale:
        return value == "relative" or isinstance(value, (int, float))
    return isinstance(value, (int, float) if kind is float else kind)


def check_config(config: Any) -> None:
    """Raise ``ValueError`` naming the first setting of a saved run configuration that is
    missing or of the wrong JSON type (``None`` is allowed where the default is ``None`` and
    for the settings of the other task)."""
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object of settings, found {type(config).__name__}")
    task = config.get("task")
    if not isinstance(task, str) or task not in RUN_TASKS:
        raise ValueError(f"'task' must be one of {tuple(RUN_TASKS)}, found {task!r}")
    defaults = {**GENERAL_DEFAULTS, **DEFAULTS[task]}
    missing = sorted(k for k in defaults if k not in config and k not in _OPTIONAL_SETTINGS)
    if missing:
        raise ValueError(f"the settings {missing} are missing")
    for key, kind in _SETTING_TYPES.items():
        value = config.get(key)
        if key not in config or (value is None and defaults.get(key) is None):
            continue  # absent and optional, of the other task, or a default of None
        if not _is_a(value, kind):
            name = {str: "a string", int: "an int", float: "a number", bool: "true or false"}
            name[PriorScale] = "a number or 'relative'"
            raise ValueError(f"'{key}' must be {name[kind]}, found {value!r}")


def check_device(device: str | None, what: str = "--device") -> None:
    """Raise :class:`UsageError` unless ``device`` (``None``: the default) names a torch device
    that this machine can allocate on (``cuda`` without a GPU, ``tpu9`` and ``cuda:7`` on a
    one-GPU machine are refused in one line, not with torch's traceback)."""
    if device is None:
        return
    try:
        _check_device(what, device)  # the learner's own check, as one line for the CLI
    except ValueError as err:
        raise UsageError(str(err)) from err


def load_run(run_dir: str | Path) -> tuple[Path, dict[str, Any], bm.MetaLearner]:
    """A run folder's path, configuration and trained learner (``learner.pt``, else the last
    ``checkpoint.pt`` of an unfinished run)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"no run folder at {run}")
    config_path = run / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(f"{run} is not a bayesmeta run folder (no {CONFIG_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, OSError) as err:
        message = f"corrupt run folder {run}: {config_path.name} is unreadable: {err}"
        raise UsageError(message) from err
    try:
        check_config(config)
    except ValueError as err:
        raise UsageError(f"corrupt run folder {run}: {config_path.name}: {err}") from err
    check_device(config.get("device"), f"the device of run folder {run} ({CONFIG_NAME})")
    for name in (LEARNER_NAME, CHECKPOINT_NAME):
        path = run / name
        if path.is_file():
            try:
                learner = bm.MetaLearner.load(path, device=local_device(config.get("device")))
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                # (The first line, cut: torch's own messages can dump whole tensors.)
                reason = str(err).splitlines()[0][:300]
                raise UsageError(
                    f"corrupt run folder {run}: cannot load {name} ({reason})"
                ) from err
            return run, config, learner
    raise UsageError(f"{run} holds no trained learner ({LEARNER_NAME} or {CHECKPOINT_NAME})")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader or a killed writer never sees half
    a file (:func:`bayesmeta.inference.checkpoint.atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
