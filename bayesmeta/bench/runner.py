"""Run the rows of a suite: in this process or in worker processes, with resumable row files.

A row (one method meta-trained and tested on one family) is independent of every other row
and seeded by itself, so rows can run side by side: on a CPU each worker is a fresh process
with one torch thread, and ``W`` workers finish a suite about ``W`` times sooner on ``W``
cores, since a row beside another slows down only a little (docs/performance.md, "Task chunks
and memory"). A fresh process per row also makes each row's peak memory its own.

Every finished row is written to ``OUT/rows/<family>--<method>.json`` atomically; with
``resume`` a killed suite reruns only the rows that have no file, or whose file was written for
another configuration. Each row also has a run folder ``OUT/rows/<family>--<method>/``, laid out
as ``bayesmeta train`` lays out its own (``config.json``, then ``checkpoint.pt`` while it
meta-trains, ``learner.pt`` and ``history.json`` once it is done): a resumed suite continues a
killed row from its last checkpoint instead of from step 0, and ``bayesmeta diagnose`` reads a
finished row's learner.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bayesmeta.bench.config import Budget, Family, Suite
from bayesmeta.inference._checks import check_int
from bayesmeta.runs import CONFIG_NAME, write_json

__all__ = [
    "Execution",
    "Job",
    "SpeedJob",
    "RowStore",
    "run_jobs",
    "auto_workers",
    "finished_rows",
    "ROWS_DIR",
]

#: Folder of the per-row files inside a suite's output folder.
ROWS_DIR = "rows"


@dataclass(frozen=True)
class Job:
    """One row to run: what :func:`bayesmeta.bench.suite.run_row` takes."""

    family: Family
    budget: Budget
    method: str
    seed: int = 0
    data_root: str | None = None
    device: str | None = None
    suite: Suite | None = None
    progress: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.family.name}--{self.method}.json"

    @property
    def run_name(self) -> str:
        """The row's run folder (see the module docstring)."""
        return f"{self.family.name}--{self.method}"


@dataclass(frozen=True)
class SpeedJob:
    """One part of a suite's speed grid: every (inner steps, order) cell of one task at ``T``
    tasks per meta-step (:func:`bayesmeta.bench.suite.speed_part`).

    Parts run in the pool beside the rows rather than alone after them: each ratio comes from
    calls interleaved in one process, so a neighbour slows both loops of a cell alike. A part
    is timed afresh in every sitting: it has no row file and no run folder.
    """

    task: str
    num_tasks: int
    seed: int
    data_root: str | None
    device: str | None
    suite: Suite

    file_name = None
    run_name = None


@dataclass(frozen=True)
class Execution:
    """How a suite's rows run.

    ``device``: where each row meta-trains (default CPU). ``threads``: ``torch.set_num_threads``
    of every row and of the speed section; ``None``: 1 on a CPU device (a second thread did not
    make a row faster on a shared CPU, and one thread disturbs a neighbour less;
    docs/performance.md), torch's own setting elsewhere. ``workers``: rows run at once, each in
    a fresh process; 1 runs them one after another in this process; ``None``: one per
    ``threads`` usable CPUs on a CPU device, 1 on a GPU. ``log``: called with one line per
    finished row or speed cell; rows also print a line to stderr about every 10% of their
    meta-training when it is given.
    """

    device: str | None = None
    threads: int | None = None
    workers: int | None = 1
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        for name in ("threads", "workers"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))


def auto_workers(device: str | None, threads: int) -> int:
    """Rows at once by default: one per ``threads`` usable CPUs on a CPU, one on a GPU (rows
    on one GPU would contend for it and the timings would mean little)."""
    if device is not None and torch.device(device).type != "cpu":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // threads)


@dataclass(frozen=True)
class RowStore:
    """Where finished rows are written (``folder``, a suite's ``OUT/rows/``) and, with
    ``resume``, read back: a row file, or a row's run folder, is reused only when it holds
    ``expected_config(job)``, the configuration of the job."""

    folder: Path
    expected_config: Callable[[Job], dict[str, Any]]
    resume: bool = False

    def resumed(self, job: Job | SpeedJob) -> dict[str, Any] | None:
        """The job's row from an earlier run of the same configuration, or ``None``."""
        if job.file_name is None or not self.resume:
            return None
        row, config = _load_row(self.folder / job.file_name), self.expected_config(job)
        if row is None or row.get("config") != config:
            return None
        return {**row, "config": config}

    def run_dir(self, job: Job | SpeedJob) -> Path | None:
        """The job's run folder: kept if ``resume`` and it was made for the same configuration,
        else emptied (a row must never continue another configuration's checkpoint)."""
        if job.run_name is None:
            return None
        folder, config = self.folder / job.run_name, self.expected_config(job)
        if self.resume and _load_row(folder / CONFIG_NAME) == config:
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_json(folder / CONFIG_NAME, config)
        return folder

    def write(self, job: Job | SpeedJob, row: dict[str, Any]) -> None:
        if job.file_name is not None:
            write_json(self.folder / job.file_name, row)


def run_jobs(
    jobs: Sequence[Job | SpeedJob],
    run_one: Callable[[Job | SpeedJob, dict, Path | None], dict[str, Any]],
    *,
    workers: int,
    threads: int,
    store: RowStore | None = None,
    cost: Callable[[Job], float] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run ``jobs`` and return their rows in the order of ``jobs``, and the names of the rows
    taken from an earlier run's files (``store.resume``).

    ``run_one(job, cache, run_dir)`` runs one row; ``cache`` is a dict that rows of one process
    share (the family's task distributions); ``run_dir`` is the row's run folder (``None``
    without a ``store``), holding ``config.json``: with ``resume``, whatever a killed run of
    the same configuration left there, otherwise nothing else. With ``cost(job)`` (a rough
    estimate), workers start the costliest jobs first, so that no long one starts last and
    runs alone. A job without a ``file_name`` (a :class:`SpeedJob`) is never written or
    resumed.
    """
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    resumed = []
    if store is not None:
        store.folder.mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(jobs):
            rows[i] = store.resumed(job)
            if rows[i] is not None:
                resumed.append(job.file_name)
    todo = [i for i, row in enumerate(rows) if row is None]
    if cost is not None:
        todo.sort(key=lambda i: -cost(jobs[i]))
    run_dirs = {i: None if store is None else store.run_dir(jobs[i]) for i in todo}

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if store is not None:
            store.write(jobs[i], row)
        if log is not None:
            log(row)

    if workers == 1 or len(todo) <= 1:
        cache: dict = {}
        for i in todo:
            finish(i, run_one(jobs[i], cache, run_dirs[i]))
    else:
        with _context().Pool(min(workers, len(todo)), maxtasksperchild=1) as pool:
            work = [(i, jobs[i], threads, run_one, run_dirs[i]) for i in todo]
            for i, row in pool.imap_unordered(_work, work):
                finish(i, row)
    return rows, resumed  # type: ignore[return-value]


def _work(args: tuple[int, Job, int, Callable, Path | None]) -> tuple[int, dict[str, Any]]:
    i, job, threads, run_one, run_dir = args
    torch.set_num_threads(threads)
    return i, run_one(job, {}, run_dir)


def _context():
    """Fresh row processes forked from a server that has already imported bayesmeta (no
    import cost per row, and no fork of a process whose thread pools are running); spawned
    processes where fork is unavailable."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bayesmeta.bench.suite"])
        return ctx
    return multiprocessing.get_context("spawn")


def finished_rows(out: Path) -> list[dict[str, Any]]:
    """The rows written so far to ``out/rows/`` (torn files, from a kill mid-write, left out)."""
    files = sorted((Path(out) / ROWS_DIR).glob("*.json"))
    return [row for row in map(_load_row, files) if row is not None]


def _load_row(path: Path) -> dict[str, Any] | None:
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or torn by a kill before the rename
        return None
    return row if isinstance(row, dict) else None
