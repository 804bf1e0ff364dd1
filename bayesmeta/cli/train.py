"""``bayesmeta train``: meta-train a learner into a run folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import bayesmeta as bm
from bayesmeta.cli._folders import (
    MARKER_NAME,
    FolderLock,
    clear_run,
    holds_only_bookkeeping,
    make_folder,
    read_marker,
    remove_leftovers,
    remove_made_folder,
    write_marker,
)
from bayesmeta.cli._processes import Followers, add_dist_timeout
from bayesmeta.cli.diagnose import DIAGNOSTICS_NAME, OUTPUTS
from bayesmeta.inference import METHODS, load_checkpoint
from bayesmeta.inference.distributed import world
from bayesmeta.inference.training import LR_SCHEDULES
from bayesmeta.runs import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    GENERAL_DEFAULTS,
    HISTORY_NAME,
    LEARNER_NAME,
    TASKS,
    UsageError,
    check_config,
    check_device,
    default_config,
    make_learner,
    make_tasks,
    settings,
    write_json,
)

__all__ = ["add_parser", "run"]

#: What ``train`` writes into a run folder (listed in its marker before they are written).
TRAIN_FILES = (CONFIG_NAME, CHECKPOINT_NAME, LEARNER_NAME, HISTORY_NAME)
#: What a run folder may hold; ``--force`` deletes only those of these that the folder's marker
#: lists (:mod:`bayesmeta.cli._folders`).
RUN_FILES = (
    *TRAIN_FILES,
    "eval.json",
    DIAGNOSTICS_NAME,
    *(f"{DIAGNOSTICS_NAME}/{n}" for n in OUTPUTS),
)
#: Settings that ``--resume`` may change; any other must match the saved run.
RESUMABLE = ("meta_steps", "checkpoint_every", "val_every", "val_tasks", "device")


def _default(key: str) -> str:
    """``key``'s default for a help text, from the settings themselves: ``[v]``, or
    ``[v / w]`` per task (sinusoid / omniglot) where they differ; a task's preset (the
    default method's measured settings, :data:`~bayesmeta.runs.settings.TASK_PRESETS`) is
    marked ``*``."""
    if key == "task":
        return f"[{GENERAL_DEFAULTS['task']}]"
    shown = []
    for task in settings.option_tasks(key):
        config = settings.default_config({"task": task, "data_root": "."})
        mark = "*" if key in settings.TASK_PRESETS[task] else ""
        shown.append(_text(config[key]) + mark)
    return f"[{shown[0]}]" if len(set(shown)) == 1 else f"[{' / '.join(shown)}]"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _inner_lr_default() -> str:
    per_task = [
        "/".join(f"{kind} {lr:.3g}" for kind, lr in settings.DEFAULTS[t]["inner_lr"].items())
        for t in TASKS
    ]
    return f"[{' / '.join(per_task)}]"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train a learner into a run folder",
        description="Meta-train a learner. Writes RUN_DIR/config.json (all settings), "
        "checkpoint.pt (every --checkpoint-every steps), history.json and learner.pt, and "
        f"{MARKER_NAME}, which lists them; a second process writing into RUN_DIR meanwhile is "
        "refused. "
        "Defaults in brackets are per task (sinusoid / omniglot); those marked * are the "
        "measured best configuration of the task's default method (the quick suite's, "
        "docs/methods.md), used when --method is not given: about 40 s for the sinusoid and "
        "3.5 minutes for Omniglot on a 2-core CPU.",
    )
    a = p.add_argument
    a("--task", choices=TASKS, help=f"task distribution {_default('task')}")
    a("--method", choices=sorted(METHODS), help=f"meta-learner {_default('method')}")
    a(
        "--meta-steps",
        type=int,
        metavar="N",
        help=f"outer steps, resumed ones included {_default('meta_steps')}",
    )
    a("--meta-batch", type=int, metavar="T", help=f"tasks per outer step {_default('meta_batch')}")
    a(
        "--inner-steps",
        type=int,
        metavar="K",
        help=f"inner SVI/gradient steps {_default('inner_steps')}",
    )
    a(
        "--inner-lr",
        type=float,
        metavar="LR",
        help="inner step size, by update rule; a gradient step is measured in the likelihood's "
        f"and the prior's curvature {_inner_lr_default()}",
    )
    a(
        "--meta-lr",
        type=float,
        metavar="LR",
        help=f"outer step size {_default('meta_lr')}; - is 1e-3 with Adam (bayes's 1e-2), "
        "Reptile's 0.5",
    )
    a(
        "--lr-schedule",
        choices=sorted(LR_SCHEDULES),
        help="outer step size over the run: constant, or cosine from --meta-lr to 0 "
        f"{_default('lr_schedule')}",
    )
    a("--particles", type=int, metavar="P", help="posterior draws per inner step [4; Delta: 1]")
    a(
        "--prior-scale",
        type=_prior_scale,
        metavar="S",
        help="initial prior sd of every weight, or 'relative': a tenth of each weight "
        f"tensor's initial RMS {_default('prior_scale')}",
    )
    a(
        "--hidden",
        metavar="W",
        help=f"MLP widths (sinusoid) or Conv4 channels (omniglot) {_default('hidden')}",
    )
    a(
        "--noise",
        type=float,
        help=f"sinusoid: noise sd of the data and the likelihood {_default('noise')}",
    )
    a("--ways", type=int, metavar="N", help=f"omniglot: classes per task {_default('ways')}")
    a(
        "--shots",
        type=int,
        metavar="K",
        help=f"support points per task (per class) {_default('shots')}",
    )
    a(
        "--queries",
        type=int,
        metavar="Q",
        help=f"query points per task (per class) {_default('queries')}",
    )
    a("--image-size", type=int, help=f"omniglot: image side in pixels {_default('image_size')}")
    a(
        "--norm",
        choices=bm.nets.conv4.NORMS,
        help="omniglot: Conv4's normalisation, batch statistics of the support set or layer "
        "norm [batch]",
    )
    a(
        "--transductive",
        action=argparse.BooleanOptionalAction,
        help="normalise query batches with their own statistics, as some papers do; a query's "
        "prediction then depends on the other queries [off]",
    )
    a(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="omniglot: shift, turn and zoom every meta-training image at random [on]",
    )
    a(
        "--data-root",
        metavar="PATH",
        help="omniglot folder [$BAYESMETA_DATA_ROOT, else the small background sets that ship "
        "with bayesmeta]",
    )
    a(
        "--val-every",
        type=int,
        metavar="N",
        help=f"validate every N steps, 0 never {_default('val_every')}",
    )
    a("--val-tasks", type=int, metavar="N", help=f"validation tasks {_default('val_tasks')}")
    a(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help=f"steps between checkpoints {_default('checkpoint_every')}",
    )
    a(
        "--seed",
        type=int,
        help="seed of the task sampler, the initial weights and the inner-loop noise "
        f"{_default('seed')}",
    )
    a("--device", help="torch device, e.g. cuda [the default device]")
    a("--out", metavar="RUN_DIR", help="run folder [runs/TASK-METHOD-seedSEED]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint"
    )
    mode.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing run folder: only the files that bayesmeta wrote there, as "
        f"listed in its {MARKER_NAME}, are deleted; a folder without one is refused",
    )
    a("--threads", type=int, metavar="N", help="torch.set_num_threads(N) [torch's default]")
    a("--quiet", action="store_true", help="no progress bar")
    add_dist_timeout(p)
    p.set_defaults(func=run)


_KEYS = (
    "task",
    "method",
    "meta_steps",
    "meta_batch",
    "inner_steps",
    "inner_lr",
    "meta_lr",
    "lr_schedule",
    "particles",
    "prior_scale",
    "hidden",
    "noise",
    "ways",
    "shots",
    "queries",
    "image_size",
    "norm",
    "transductive",
    "augment",
    "data_root",
    "val_every",
    "val_tasks",
    "checkpoint_every",
    "seed",
    "device",
)


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None}


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def _check_applies(given: dict[str, Any], task: str) -> None:
    """Refuse options of the other task (they would be saved, and mean nothing)."""
    foreign = [k for k in given if task not in settings.option_tasks(k)]
    if foreign:
        flags = ", ".join(_flag(k) for k in foreign)
        owners = " / ".join(settings.option_tasks(foreign[0]))
        raise UsageError(
            f"{flags} {'applies' if len(foreign) == 1 else 'apply'} to --task "
            f"{owners} only; this run's task is {task}: drop "
            f"{'it' if len(foreign) == 1 else 'them'}"
        )


def _prior_scale(text: str) -> float | str:
    """``--prior-scale``: a number, or ``relative``."""
    if text == "relative":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'relative', got {text!r}") from None


def _check_numbers(config: dict[str, Any]) -> None:
    for key in ("meta_steps", "meta_batch", "shots", "queries", "val_tasks", "checkpoint_every"):
        if config.get(key) is not None and config[key] < 1:
            raise UsageError(f"{_flag(key)} must be a positive int, got {config[key]}")
    if config["val_every"] < 0:
        raise UsageError(f"--val-every must be >= 0, got {config['val_every']}")
    for key in ("inner_lr", "meta_lr", "prior_scale", "noise"):
        value = config.get(key)
        if key == "prior_scale" and value == "relative":
            continue
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_flag(key)} must be a positive finite number, got {value}")


def _prepare_folder(out: Path, args: argparse.Namespace, given: dict[str, Any]) -> dict:
    """The run's configuration, once the folder (locked) is known to suit the mode: a
    checkpoint to ``--resume``, or an empty folder, or a marked run folder to ``--force``."""
    if args.resume:
        ckpt = out / CHECKPOINT_NAME
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
        try:
            saved = json.loads((out / CONFIG_NAME).read_text())
            check_config(saved)
        except (OSError, ValueError) as err:
            raise UsageError(f"--resume: cannot read {out / CONFIG_NAME}: {err}") from err
        try:  # (before the folder is marked as bayesmeta's, if it is not yet)
            load_checkpoint(ckpt)
        except ValueError as err:
            raise UsageError(f"--resume: {err}") from err
        _check_applies(given, saved["task"])
        config = dict(saved)
        for key, value in given.items():
            if key in RESUMABLE:
                config[key] = value
            elif config.get(key) != value:
                raise UsageError(
                    f"--resume: --{key.replace('_', '-')} {value} differs from the saved run's "
                    f"{config.get(key)}; only {', '.join(RESUMABLE)} may change on resume"
                )
        if config["lr_schedule"] != "constant" and config["meta_steps"] != saved["meta_steps"]:
            raise UsageError(
                f"--resume: --meta-steps {config['meta_steps']} differs from the saved run's "
                f"{saved['meta_steps']}, and its {config['lr_schedule']} --lr-schedule is laid "
                "out over the run's length; start a new run to train longer"
            )
        return config
    _check_applies(given, given.get("task", GENERAL_DEFAULTS["task"]))
    if not holds_only_bookkeeping(out):
        if not args.force:
            raise UsageError(
                f"run folder {out} exists; pass --resume to continue it or --force to overwrite it"
            )
        if read_marker(out) is None:
            raise UsageError(
                f"--force: {out} is not a bayesmeta run folder (it lacks the {MARKER_NAME} that "
                "bayesmeta writes into its run folders; those of older versions lack it too); "
                "refusing to delete anything in it: choose another --out, or empty it yourself"
            )
    return default_config(given)


def run(args: argparse.Namespace) -> int:
    given = _explicit(args)
    task = given.get("task", GENERAL_DEFAULTS["task"])
    method = given.get("method") or settings.TASK_PRESETS.get(task, {}).get("method", "bayes")
    out = Path(args.out or f"runs/{task}-{method}-seed{given.get('seed', 0)}")
    if world()[0] != 0:
        return _follow(out)
    followers = Followers()
    try:
        return _lead(out, args, given, followers)
    except BaseException as err:
        followers.tell({"code": getattr(err, "code", 1)})
        raise


def _lead(out: Path, args: argparse.Namespace, given: dict[str, Any], followers: Followers):
    """Train on rank 0 (the only rank of a single process): it checks, writes and prints."""
    check_device(given.get("device"))
    if args.resume and not out.is_dir():
        raise UsageError(
            f"--resume: no checkpoint at {out / CHECKPOINT_NAME}; start the run without --resume"
        )
    made = make_folder(out, "run folder")
    try:
        with FolderLock(out):  # one writer at a time, from the checks to the last file
            return _run(out, args, given, followers)
    finally:
        if made is not None and holds_only_bookkeeping(out):
            # Refused before anything was written: leave no empty folder behind.
            (out / MARKER_NAME).unlink(missing_ok=True)
            remove_made_folder(out, made)


def _run(out: Path, args: argparse.Namespace, given: dict[str, Any], followers: Followers) -> int:
    config = _prepare_folder(out, args, given)
    _check_numbers(config)
    config["world_size"] = world()[1]  # of this run (a resumed one may have had another)
    if config["meta_batch"] < config["world_size"]:
        raise UsageError(
            f"--meta-batch {config['meta_batch']} is smaller than the {config['world_size']} "
            "processes: give every process at least one task"
        )
    learner = make_learner(config)
    tasks = make_tasks(config, "train")  # (data that cannot be read fails before any write)
    val = make_tasks(config, "val") if config["val_every"] > 0 else None
    if args.resume:
        # Partial files of a killed write are no checkpoint; nothing else writes here now.
        remove_leftovers(out, TRAIN_FILES)
        if read_marker(out) is None:  # a run folder of an older version: mark it now
            write_marker(out, TRAIN_FILES)
    else:
        if read_marker(out) is not None:
            clear_run(out, RUN_FILES)  # (only with --force: _prepare_folder checked)
        write_marker(out, TRAIN_FILES)
    write_json(out / CONFIG_NAME, {**config, "bayesmeta_version": bm.__version__})
    followers.tell({"config": config})
    start = time.perf_counter()
    try:
        history = _fit(learner, config, out, not args.quiet, tasks, val)
    except KeyboardInterrupt:
        print(
            f"interrupted at step {learner.step}; the last checkpoint is in {out}; continue "
            f"with: bayesmeta train --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    except bm.inference.NonFiniteLossError as err:
        raise UsageError(
            f"training stopped: {err} (--inner-lr, --particles; a smaller --meta-lr can help too)",
            code=1,
        ) from err
    except ValueError as err:  # e.g. a checkpoint of other settings
        raise UsageError(str(err)) from err
    write_json(out / HISTORY_NAME, history)
    learner.save(out / LEARNER_NAME)
    last = history[-1] if history else {}
    loss = f", final loss {last['loss']:.4g}" if "loss" in last else ""
    print(
        f"trained {config['task']}/{config['method']} to step {learner.step} in "
        f"{time.perf_counter() - start:.1f}s{loss}"
    )
    print(f"run folder: {out} ({CONFIG_NAME}, {CHECKPOINT_NAME}, {HISTORY_NAME}, {LEARNER_NAME})")
    print(f"next: bayesmeta eval {out}")
    return 0


def _follow(out: Path) -> int:
    """Train on a rank other than 0, once rank 0 has set the run folder up: its share of every
    meta-batch, writing nothing (the checkpoint to resume is read from ``out``)."""
    message = Followers.listen()
    if "config" not in message:
        return message["code"]  # rank 0 refused the run and said why
    config = message["config"]
    tasks = make_tasks(config, "train")
    val = make_tasks(config, "val") if config["val_every"] > 0 else None
    try:
        _fit(make_learner(config), config, out, False, tasks, val)
    except (bm.inference.NonFiniteLossError, ValueError):
        return 1  # (every rank raises it; rank 0 says why)
    return 0


def _fit(learner, config: dict[str, Any], out: Path, progress: bool, tasks, val) -> list:
    """Meta-train ``learner`` as ``config`` says, checkpointing into (and resuming from) ``out``."""
    return learner.fit(
        tasks,
        meta_steps=config["meta_steps"],
        meta_batch=config["meta_batch"],
        val_tasks=val,
        val_every=max(config["val_every"], 1),
        val_num_tasks=config["val_tasks"],
        checkpoint_dir=out,
        checkpoint_every=config["checkpoint_every"],
        resume=True,
        seed=config["seed"],
        progress=progress,
        lr_schedule=config["lr_schedule"],
    )
