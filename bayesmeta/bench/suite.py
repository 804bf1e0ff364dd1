"""Run a benchmark suite: every method on every family, and the speed grid; one JSON.

    >>> from bayesmeta.bench import run_suite
    >>> results = run_suite("quick", out="bench_out/quick")   # results.json + results.md

Each (method, family) row meta-trains a fresh learner built exactly as ``bayesmeta train``
builds it (:func:`bayesmeta.runs.make_learner` over the CLI's defaults, with the
suite's budget and :data:`~bayesmeta.bench.config.METHOD_OPTIONS`), then scores it with
:func:`bayesmeta.evaluate` on the family's test conditions (:mod:`bayesmeta.bench.tasks`).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyro
import torch

import bayesmeta as bm
from bayesmeta.bench.config import (
    METHOD_OPTIONS,
    SUITES,
    Budget,
    Family,
    Suite,
)
from bayesmeta.bench.memory import PeakRSS, max_rss_mb
from bayesmeta.bench.report import render_markdown
from bayesmeta.bench.runner import (
    ROWS_DIR,
    Execution,
    Job,
    RowStore,
    SpeedJob,
    auto_workers,
    run_jobs,
)
from bayesmeta.bench.speed import external_baselines, loop_speed, method_costs
from bayesmeta.bench.tasks import family_spec, family_tasks, reads_data_root
from bayesmeta.data import Omniglot
from bayesmeta.inference.metrics import auroc
from bayesmeta.runs import (
    CHECKPOINT_NAME,
    HISTORY_NAME,
    LEARNER_NAME,
    default_config,
    make_learner,
    write_json,
    write_text,
)

__all__ = [
    "run_suite",
    "learner_config",
    "run_row",
    "speed_section",
    "environment",
    "SCHEMA_VERSION",
    "JSON_NAME",
    "MARKDOWN_NAME",
]

SCHEMA_VERSION = 1
JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
#: Offset of the test tasks' seed from the training seed (as ``bayesmeta eval``'s 1000).
EVAL_SEED_OFFSET = 1000


def learner_config(
    family: Family,
    budget: Budget,
    method: str,
    seed: int = 0,
    data_root: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The ``bayesmeta train`` configuration of one row: CLI defaults, the suite's budget, then
    the method's per-task options, then the budget's ``particles``."""
    spec_of_family = family_spec(family.task)
    given: dict[str, Any] = {
        "task": spec_of_family.run_task,
        "method": method,
        "meta_steps": budget.meta_steps,
        "meta_batch": budget.meta_batch,
        "inner_steps": budget.inner_steps,
        "shots": family.shots,
        "queries": family.queries,
        "seed": seed,
        "lr_schedule": budget.lr_schedule,
        "val_every": 0,
        "device": device,
    }
    if family.ways is not None:
        given["ways"] = family.ways
    if budget.hidden is not None:
        given["hidden"] = budget.hidden
    if budget.test_inner_steps is not None:
        given["test_inner_steps"] = budget.test_inner_steps
    spec = bm.inference.METHODS.get(method)
    guide = bm.models.GUIDES.get(spec.guide) if spec is not None else None
    draws = guide is not None and guide.monte_carlo
    if budget.eval_particles is not None and draws:
        given["eval_particles"] = budget.eval_particles
    if budget.meta_lr is not None and spec is not None and spec.outer.name != "reptile":
        given["meta_lr"] = budget.meta_lr  # (Reptile's is its interpolation ε, with SGD)
    if spec_of_family.folder is not None and data_root is not None:
        given["data_root"] = str(data_root)
    given.update(spec_of_family.settings)
    given.update(METHOD_OPTIONS.get(method, {}).get(family.task, {}))
    if budget.particles is not None and draws:
        given["particles"] = budget.particles
    return default_config(given)


def _stored_config(config: dict[str, Any], family: Family, budget: Budget) -> dict[str, Any]:
    """A row's ``config`` as the results hold it (and as ``--resume`` compares it)."""
    return {**config, "task": family.task, "test_tasks": budget.test_tasks}


def _family_tasks(family: Family, config: dict[str, Any], suite: Suite | None):
    """The task distributions of a row with ``config`` (see :func:`family_tasks`)."""
    return family_tasks(
        family,
        noise=config["noise"] or 0.0,
        data_root=config["data_root"],
        held_out_fraction=suite.held_out_fraction if suite is not None else 0.2,
        augment=bool(config["augment"]),
    )


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def run_row(
    job: Job,
    *,
    tasks=None,
    run_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Meta-train and test one method on one family (``job``: its family, budget, method, seed,
    data root, device and suite); the row of the results JSON.

    ``tasks`` (a :class:`~bayesmeta.bench.tasks.FamilyTasks`) is built when not given. A run
    that breaks down (a non-finite loss, non-finite scores) becomes a row with ``error`` set.
    With ``run_dir``, meta-training is checkpointed there about every 2% of its steps and
    continues from a checkpoint it finds (bit for bit, see :meth:`MetaLearner.fit`; the row
    then says from which step, in ``training["resumed_from_step"]``), and the row's learner
    ends there as ``bayesmeta train`` leaves its own (``learner.pt``, ``history.json``; the
    caller writes ``config.json``), for ``bayesmeta diagnose``. ``progress`` gets a line about
    every 10% of the steps.
    """
    family, budget, method, seed = job.family, job.budget, job.method, job.seed
    config = learner_config(family, budget, method, seed, job.data_root, job.device)
    if tasks is None:
        tasks = _family_tasks(family, config, job.suite)
    run = family_spec(family.task).run
    row = _row_head(family, method, seed, _stored_config(config, family, budget), tasks)
    start = time.perf_counter()

    def say(step: int) -> None:
        if progress is not None:
            minutes = (time.perf_counter() - start) / 60.0
            where = f"step {step}/{config['meta_steps']}"
            progress(f"{family.name}/{method}: {where} ({minutes:.1f} min)")

    with PeakRSS() as mem:
        learner = make_learner(config)
        history, resumed_from, errors = _train(learner, tasks.train, config, run_dir, say)
        train_seconds = time.perf_counter() - start
        evaluations, point_scores = {}, {}
        if not errors:
            evaluations, point_scores = _test(learner, tasks, budget, seed, errors)
    step_seconds = sum(r["seconds"] for r in history)
    row["training"] = {
        "meta_steps": len(history),
        "skipped_steps": learner.skipped_steps,
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "seconds": train_seconds,
        "tasks_per_second": len(history) * config["meta_batch"] / max(step_seconds, 1e-12),
    }
    if resumed_from > 0:
        row["training"]["resumed_from_step"] = resumed_from
    if learner.skipped_steps:
        errors.append(f"{learner.skipped_steps} meta-steps had a non-finite loss and were skipped")
    row["evaluations"] = evaluations
    row["error"] = "; ".join(errors) or None
    if run_dir is not None and history:
        _keep_learner(Path(run_dir), learner, history)
    row["wall_seconds"] = time.perf_counter() - start
    row["memory"] = {"peak_rss_mb": mem.peak_mb, "start_rss_mb": mem.start_mb}
    row["ood"].update(_shift_scores(run.metric, tasks, evaluations, point_scores))
    if run.classes and not errors:
        row["out_of_episode"] = _out_of_episode(learner, tasks, budget, seed)
    return row


def _row_head(family: Family, method: str, seed: int, config: dict, tasks) -> dict[str, Any]:
    """What a row says before it runs: what it is, its configuration, its test conditions."""
    return {
        "method": method,
        "family": family.name,
        "task": family.task,
        "kind": family_spec(family.task).run.kind,
        "seed": seed,
        "config": config,
        "headline": tasks.headline,
        "ood": {"reference": tasks.reference, "shifted": tasks.shifted},
        "conditions": {k: c.description for k, c in tasks.conditions.items()},
        "notes": list(tasks.notes),
        "error": None,
    }


def _train(learner, train, config: dict[str, Any], run_dir, say) -> tuple[list, int, list[str]]:
    """Meta-train as a suite row does: the history, the step it resumed from (0: none) and
    what went wrong. ``say`` gets the step about every 10% of the steps."""
    steps = config["meta_steps"]
    first_step: list[int] = []

    def watch(_learner: object, record: dict[str, float]) -> None:
        if not first_step:
            first_step.append(int(record["step"]))
        if record["step"] % max(1, steps // 10) == 0:
            say(record["step"])

    try:
        history = learner.fit(
            train,
            steps,
            config["meta_batch"],
            seed=config["seed"],
            progress=False,
            skip_nonfinite=True,
            checkpoint_dir=run_dir,
            checkpoint_every=max(1, steps // 50),
            callback=watch,
            lr_schedule=config["lr_schedule"],
        )
        errors = []
    except (RuntimeError, ValueError) as err:
        history, errors = [], [f"training failed: {_short(err)}"]
    # Steps restored from a checkpoint come first in the history; the first step this
    # sitting ran is the one after them (none ran if the checkpoint was the last step's).
    return history, first_step[0] - 1 if first_step else len(history), errors


def _test(learner, tasks, budget: Budget, seed: int, errors: list[str]):
    """Every condition's scores (``None`` where testing failed, with the reason appended to
    ``errors``) and its per-point uncertainty scores, on test tasks drawn from ``seed``'s."""
    evaluations: dict[str, dict[str, float] | None] = {}
    point_scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, condition in tasks.conditions.items():
        try:
            scores, point_scores[name] = bm.evaluate(
                learner,
                condition.tasks,
                num_tasks=budget.test_tasks,
                meta_batch=budget.eval_batch,
                seed=seed + EVAL_SEED_OFFSET,
                return_scores=True,
            )
            metrics = scores.to_dict()  # (a row is JSON: accuracy a fraction)
        except (RuntimeError, ValueError) as err:  # e.g. an adaptation that diverged
            metrics = None
            errors.append(f"testing on {name} failed: {_short(err)}")
        if metrics is not None and not _finite(metrics):
            metrics = None
            errors.append(f"testing on {name} gave non-finite scores")
        evaluations[name] = metrics
    return evaluations, point_scores


def _shift_scores(key: str, tasks, evaluations, point_scores) -> dict[str, Any]:
    """The generalisation gap in the headline ``key`` between the reference and the shifted
    condition, and whether a query's uncertainty tells the shifted condition's points from
    the reference condition's (AUROC by entropy and by mutual information)."""
    ref, shifted = evaluations.get(tasks.reference), evaluations.get(tasks.shifted)
    ok = ref is not None and shifted is not None
    out: dict[str, Any] = {"gap": float("nan")}
    if ok:
        out["gap"] = ref[key] - shifted[key] if key == "accuracy" else shifted[key] - ref[key]
    for score in ("entropy", "mutual_information"):
        out[f"auroc_{score}"] = (
            auroc(point_scores[tasks.reference][score], point_scores[tasks.shifted][score])
            if ok
            else float("nan")
        )
    out["gap_definition"] = (
        f"{key}({tasks.reference}) - {key}({tasks.shifted})"
        if key == "accuracy"
        else f"{key}({tasks.shifted}) - {key}({tasks.reference})"
    ) + "; positive = worse under the shift"
    return out


def _out_of_episode(learner, tasks, budget: Budget, seed: int) -> dict[str, Any]:
    """Out-of-episode detection on the headline condition's tasks (:func:`evaluate_out_of_episode`:
    ``2N``-way draws, half the classes out of episode), or why it could not run."""
    try:
        return bm.inference.evaluate_out_of_episode(
            learner,
            tasks.conditions[tasks.headline].tasks,
            num_tasks=budget.test_tasks,
            meta_batch=budget.eval_batch,
            seed=seed + EVAL_SEED_OFFSET,
        )
    except (AttributeError, RuntimeError, ValueError) as err:  # e.g. too few classes for 2N
        return {"error": _short(err)}


def _keep_learner(run_dir: Path, learner: bm.MetaLearner, history: list[dict]) -> None:
    """Leave the trained learner as ``bayesmeta train`` does. The checkpoint goes last: a kill
    before that still finds it, and a kill after only costs retraining to the same numbers."""
    write_json(run_dir / HISTORY_NAME, history)
    learner.save(run_dir / LEARNER_NAME)
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)


def _short(err: BaseException, limit: int = 160) -> str:
    """The first line of an error, cut to ``limit`` characters (Pyro's dump whole tensors)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _speed_family(suite: Suite, task: str) -> Family:
    """The task shape the speed grid times: the suite's own 5-way 1-shot Omniglot family or
    10-shot sinusoid family (so the tasks per second are those its rows meta-train on), else
    Finn et al.'s (15 queries per class, 10 sinusoid queries)."""
    default = family_spec(task).speed
    if default is None:
        raise ValueError(f"the speed grid times sinusoid and omniglot tasks, got {task!r}")
    for family in suite.families:
        if family.task == task and (family.ways, family.shots) == (default.ways, default.shots):
            return family
    return default


def _speed_batch(family: Family, T: int, data_root: str | None, generator: torch.Generator):
    return family_spec(family.task).speed_tasks(family, data_root).sample(T, generator)


def speed_part(
    suite: Suite,
    task: str,
    T: int,
    seed: int = 0,
    data_root: str | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """The speed grid's rows for one task at ``T`` tasks per meta-step: one per (inner steps,
    order) cell, seconds per meta-step of the batched inner loop against the per-task loop
    (and learn2learn / higher where importable), as ratios."""
    grid = suite.speed
    if grid is None:
        return []
    family = _speed_family(suite, task)
    hidden = grid.width(family_spec(task).run_task)
    g = torch.Generator().manual_seed(seed)
    batch = _speed_batch(family, T, data_root, g)
    rows = []
    for steps in grid.inner_steps:
        for first_order in grid.first_order:
            method = "fomaml" if first_order else "maml"
            budget = Budget(1, T, steps, hidden=hidden)
            config = learner_config(family, budget, method, seed, data_root, device)

            def make(config=config):
                return make_learner(config)  # the same θ every call (seeded)

            probe = make()
            moved = batch.to(probe.device)
            secs = loop_speed(make, moved, first_order, grid.repeats, grid.warmup, g)
            row = {
                "task": task,
                "shape": {"ways": family.ways, "shots": family.shots, "queries": family.queries},
                "backbone": family_spec(task).run.backbone(hidden),
                "T": T,
                "inner_steps": steps,
                "order": "first" if first_order else "second",
                "ms_per_step": {k: 1e3 * v for k, v in secs.items()},
                "batched_tasks_per_second": T / secs["batched"],
                "per_task_tasks_per_second": T / secs["per_task"],
                "speedup_vs_per_task": secs["per_task"] / secs["batched"],
            }
            for name in ("learn2learn", "higher"):
                if name in secs:
                    row[f"speedup_vs_{name}"] = secs[name] / secs["batched"]
            rows.append(row)
    if T == grid.cost_tasks and grid.cost_methods:

        def config_of(method: str, budget: Budget) -> dict[str, Any]:
            return learner_config(family, budget, method, seed, data_root, device)

        rows.append(_method_costs(suite, family, hidden, batch, g, config_of))
    return rows


def _method_costs(suite, family, hidden, batch, generator, config_of) -> dict[str, Any]:
    """One speed row: each of the grid's ``cost_methods``' ms per meta-step as the suite trains
    it (``config_of(method, budget)``: its options and the family's budget, at the batch's
    ``T`` tasks), and its ratio to maml's."""
    grid, T = suite.speed, batch.support_x.shape[0]
    budget = replace(suite.budgets.get(family.name, Budget(1, T, 1)), meta_batch=T, hidden=hidden)
    makers = {}
    for method in grid.cost_methods:
        if suite.not_run(method, family.task):
            continue
        config = config_of(method, budget)
        makers[method] = lambda config=config: make_learner(config)
    secs = method_costs(makers, batch.to(next(iter(makers.values()))().device),
                        grid.repeats, grid.warmup, generator)  # fmt: skip
    base = secs.get("maml")
    return {
        "task": family.task,
        "kind": "method_cost",
        "shape": {"ways": family.ways, "shots": family.shots, "queries": family.queries},
        "backbone": family_spec(family.task).run.backbone(hidden),
        "T": T,
        "ms_per_step": {k: 1e3 * v for k, v in secs.items()},
        "vs_maml": {k: v / base for k, v in secs.items()} if base else {},
    }


def speed_section(
    suite: Suite,
    seed: int = 0,
    data_root: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The suite's whole speed grid in this process: :func:`speed_part` for every task and T
    (:func:`run_suite` runs the parts as jobs of their own)."""
    grid = suite.speed
    rows = []
    for task in grid.tasks if grid is not None else ():
        for T in grid.num_tasks:
            part = speed_part(suite, task, T, seed, data_root, device)
            rows += part
            if log is not None:
                for line in map(_speed_line, part):
                    log(line)
    return rows


def _speed_line(row: dict[str, Any]) -> str:
    if row.get("kind") == "method_cost":
        costs = ", ".join(f"{m} {ms:.0f}" for m, ms in row["ms_per_step"].items())
        return f"speed {row['task']} T={row['T']}: ms per meta-step {costs}"
    return (
        f"speed {row['task']} T={row['T']} K={row['inner_steps']} {row['order']} order: batched "
        f"{row['speedup_vs_per_task']:.2f}x the per-task loop"
    )


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions and machine description recorded with every result."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    machine = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        machine["device_name"] = torch.cuda.get_device_name(dev)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "bayesmeta": bm.__version__,
    }
    code = code_version()
    if code is not None:
        versions["code"] = code
    return {"versions": versions, "machine": machine}


def code_version() -> str | None:
    """The git commit of the bayesmeta checkout that runs, ``+changes`` when its tracked
    files differ from it; ``None`` outside a git checkout (an installed wheel)."""
    root = Path(bm.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        run = functools.partial(
            subprocess.run, cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        commit = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        changed = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


def _check_methods(methods: Sequence[str] | None, suite: Suite) -> list[str]:
    if methods is None:
        return list(suite.methods)
    methods = list(methods)
    unknown = [m for m in methods if m not in bm.inference.METHODS]
    if unknown or not methods:
        raise ValueError(
            f"methods must be a non-empty subset of {sorted(bm.inference.METHODS)}, got {methods}"
        )
    return methods


def _resolve_suite(suite: str | Suite) -> Suite:
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"suite must be one of {list(SUITES)}, got {suite!r}")
        suite = SUITES[suite]
    if not isinstance(suite, Suite):
        raise TypeError(f"suite must be a suite name or a Suite, got {type(suite).__name__}")
    return suite


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _jobs(
    suite: Suite,
    methods: list[str],
    seed: int,
    data_root: str | Path | None,
    device: str | None,
    progress: bool = False,
) -> list[Job | SpeedJob]:
    """The rows in the order of the results, then the speed grid's parts (task, then T)."""
    jobs: list[Job | SpeedJob] = []
    for family in suite.families:
        folder = family_spec(family.task).folder
        root = suite.image_folder if folder == "image_folder" else data_root
        root = None if root is None else str(root)
        budget = suite.budgets[family.name]
        for method in methods:
            if suite.not_run(method, family.task) is None:
                jobs.append(Job(family, budget, method, seed, root, device, suite, progress))
    grid = suite.speed
    root = None if data_root is None else str(data_root)
    for task in grid.tasks if grid is not None else ():
        jobs += [SpeedJob(task, T, seed, root, device, suite) for T in grid.num_tasks]
    return jobs


def _row_config(job: Job) -> dict[str, Any]:
    """The ``config`` of a job's row (a row file is reused only if it holds this one)."""
    config = learner_config(job.family, job.budget, job.method, job.seed, job.data_root, job.device)
    return _stored_config(config, job.family, job.budget)


def _job_cost(job: Job | SpeedJob) -> float:
    """Task-points meta-trained, doubled for ``bayes``: only the order jobs start in uses it.

    A speed part meta-trains ``T`` tasks in each of its calls: warm-up and timed ones, of the
    batched and the per-task loop, in each cell (in the quick suite a Conv4 part took about
    1.4 times a 5-way row's seconds per task-point, close enough to order them).
    """
    if isinstance(job, SpeedJob):
        grid = job.suite.speed
        calls = 2 * (grid.warmup + grid.repeats) * len(grid.inner_steps) * len(grid.first_order)
        return calls * job.num_tasks * _task_points(_speed_family(job.suite, job.task))
    budget = job.budget
    points = _task_points(job.family)
    return budget.meta_steps * budget.meta_batch * points * (2 if job.method == "bayes" else 1)


def _task_points(family: Family) -> float:
    return family.ways * (family.shots + family.queries) if family.ways else 0.5


def _progress_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_job(job: Job | SpeedJob, cache: dict, run_dir: Path | None) -> dict[str, Any]:
    """One row, or ``{"speed": rows}`` of a speed part; the family's task distributions are
    built once per ``cache`` (process)."""
    if isinstance(job, SpeedJob):
        rows = speed_part(job.suite, job.task, job.num_tasks, job.seed, job.data_root, job.device)
        return {"speed": _json_safe(rows)}
    if job.family.name not in cache:
        config = learner_config(job.family, job.budget, job.method, job.seed, job.data_root)
        cache[job.family.name] = _family_tasks(job.family, config, job.suite)
    row = run_row(
        job,
        tasks=cache[job.family.name],
        run_dir=run_dir,
        progress=_progress_line if job.progress else None,
    )
    return _json_safe(row)


def run_suite(
    suite: str | Suite,
    methods: Sequence[str] | None = None,
    *,
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    seed: int = 0,
    execution: Execution | None = None,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``suite`` for ``methods`` (default: the suite's, ``suite.methods``).

    Parameters
    ----------
    suite : "smoke" | "quick" | "standard" | "full", or a :class:`Suite` (without its speed
        grid: ``replace(suite, speed=None)``; with an image set's families:
        ``suite.with_image_folder(folder)``)
    out : folder to write ``results.json`` and ``results.md`` into (created)
    data_root : the Omniglot folder (default: as ``bayesmeta train``); a suite with
        ``omniglot="full"`` first downloads torchvision's Omniglot into it (created)
    execution : device, threads, rows at once and the progress log (default
        ``Execution()``: CPU, one thread, one row at a time, no log;
        :class:`~bayesmeta.bench.runner.Execution`; rows run in worker processes as
        :mod:`bayesmeta.bench.runner` says). The speed grid's parts (one per task and T) run
        among the rows, as jobs of their own
    resume : with ``out``, reuse the rows an earlier run of the same configuration left in
        ``out/rows/`` (each finished row is written there) and run only the others; a row
        that was killed continues from its last meta-training checkpoint. The speed grid is
        always timed afresh
    command : the command line recorded in the results (default: this process's)

    Returns
    -------
    dict, the results JSON (see ``docs/results_quick.json``).
    """
    suite = _resolve_suite(suite)
    execution = Execution() if execution is None else execution
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be an Execution, got {type(execution).__name__}")
    methods = _check_methods(methods, suite)
    _download_if_full(suite, data_root)
    device, threads, log = execution.device, execution.threads, execution.log
    if threads is None and (device is None or torch.device(device).type == "cpu"):
        threads = 1
    if resume and out is None:
        raise ValueError("resume=True needs out: the folder whose rows/ it resumes")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    threads = torch.get_num_threads()
    workers = execution.workers or auto_workers(device, threads)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    try:
        jobs = _jobs(suite, methods, seed, data_root, device, log is not None)
        done, resumed = run_jobs(
            jobs,
            _run_job,
            workers=workers,
            threads=threads,
            store=None if out is None else RowStore(Path(out) / ROWS_DIR, _row_config, resume),
            cost=_job_cost,
            log=None if log is None else lambda row: _log_job(row, log),
        )
        pairs = list(zip(jobs, done, strict=True))
        rows = [row for job, row in pairs if isinstance(job, Job)]
        speed_rows = [c for job, row in pairs if isinstance(job, SpeedJob) for c in row["speed"]]
        env = environment(device)
    finally:
        torch.set_num_threads(previous)
    results = _results(suite, methods, seed, command, started, env, workers, resumed)
    results.update(rows=rows, speed=speed_rows, wall_seconds=time.perf_counter() - start)
    # As written and read back (keys sorted), so that results.md equals a --render of the file.
    results = json.loads(json.dumps(_json_safe(results), sort_keys=True))
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / JSON_NAME, results)
        write_text(folder / MARKDOWN_NAME, render_markdown(results))
    return results


def _download_if_full(suite: Suite, data_root: str | Path | None) -> None:
    """A suite on torchvision's full Omniglot downloads it into ``data_root`` first."""
    if suite.omniglot == "full" and reads_data_root(suite.families):
        if data_root is None:
            raise ValueError(
                f"the {suite.name} suite downloads torchvision's Omniglot into data_root; "
                "pass a writable folder, got None"
            )
        # Once, here, before any job: rows in parallel processes would otherwise download
        # into the same folder at once, and the speed grid's parts do not download at all.
        Omniglot.download(data_root)


def _results(suite, methods, seed, command, started, env, workers, resumed) -> dict[str, Any]:
    """The results JSON but its rows, speed rows and wall time."""
    return {
        "schema": SCHEMA_VERSION,
        "suite": suite.name,
        "suite_config": asdict(suite),
        "methods": methods,
        "seed": seed,
        "command": command or " ".join(sys.argv),
        "started_utc": started.isoformat(timespec="seconds"),
        **env,
        "workers": workers,
        "resumed_rows": resumed,
        "not_run": [
            {"method": m, "family": f.name, "reason": suite.not_run(m, f.task)}
            for f in suite.families
            for m in methods
            if suite.not_run(m, f.task) is not None
        ],
        "speed_baselines": external_baselines(),
        "memory_method": PeakRSS().method
        + ("; every row ran in a fresh process" if workers > 1 else ""),
        "process_max_rss_mb": max_rss_mb(),
        "time_budget_seconds": suite.time_budget_s,
    }


def _log_job(row: dict[str, Any], log: Callable[[str], None]) -> None:
    for line in map(_speed_line, row["speed"]) if "speed" in row else [_row_line(row)]:
        log(line)


def _row_line(row: dict[str, Any]) -> str:
    head = row["evaluations"].get(row["headline"]) or {}
    key = family_spec(row["task"]).run.metric
    if key not in head:
        score = "failed"
    elif key == "accuracy":  # (a fraction in the row; a percentage for people)
        score = f"accuracy {100 * head[key]:.1f}%"
    else:
        score = f"{key} {head[key]:.4g}"
    if row["error"]:
        score += f" [{row['error']}]"
    return (
        f"{row['family']:<16} {row['method']:<8} {score}  "
        f"({row['wall_seconds']:.0f}s, {row['training']['tasks_per_second']:.0f} tasks/s)"
    )
