"""Meta-training throughput on 1 and more processes (torch.distributed, gloo on the CPU).

    python benchmarks/bench_distributed.py [--procs 1 2] [--methods maml bayes]
                                           [--workloads sinusoid conv4] [--steps 8]

Every process runs with one torch thread, as ``torchrun`` would place one process per core
(or per GPU), and shards each meta-batch with its peers exactly as ``fit`` does
(:meth:`bayesmeta.MetaLearner.meta_step`). Workloads:

- ``sinusoid``: ``bayesmeta train``'s default sinusoid learner (MLP 1-40-40-1, 10 shots and 10
  queries, 5 inner steps), 32 tasks per meta-step;
- ``conv4``: its default Omniglot learner (Conv4-32, 5-way 1-shot, 28 x 28 images, 15 queries
  per class, 5 inner steps), 32 tasks per meta-step. The images are random (throughput does not
  depend on them; nothing is read).

Rank 0 times each meta-step between two barriers; the first two steps are warm-up. Reported:
the median seconds per meta-step, tasks per second, and the scaling efficiency
``tasks/s (N) / (N · tasks/s (1))``. The process counts are run in turn, in one sitting; run
nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bayesmeta.data import TaskBatch
from bayesmeta.runs import default_config, make_learner, make_tasks

META_BATCH = 32
WARMUP = 2


class RandomImages:
    """5-way 1-shot tasks of random 28 x 28 images (15 queries per class)."""

    def sample(self, num_tasks: int, generator: torch.Generator | None = None) -> TaskBatch:
        def part(per_class: int):
            x = torch.rand(num_tasks, 5 * per_class, 1, 28, 28, generator=generator)
            y = torch.arange(5).repeat_interleave(per_class).expand(num_tasks, -1)
            return x, y

        return TaskBatch(*part(1), *part(15), num_classes=5)


def _workload(name: str, method: str):
    """The learner ``bayesmeta train`` builds by default for the task, and its tasks."""
    if name == "sinusoid":
        config = default_config({"task": "sinusoid", "method": method})
        return make_learner(config), make_tasks(config, "train")
    config = default_config({"task": "omniglot", "method": method, "augment": False})
    return make_learner(config), RandomImages()


def _worker(rank: int, size: int, rendezvous: str, out: str, jobs: list, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=600),
    )
    results = []
    for workload, method in jobs:
        learner, tasks = _workload(workload, method)
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(WARMUP + steps):
            batch = tasks.sample(META_BATCH, generator=g)
            dist.barrier()
            start = time.perf_counter()
            learner.meta_step(batch, g)
            dist.barrier()
            times.append(time.perf_counter() - start)
        results.append({"workload": workload, "method": method, "times": times[WARMUP:]})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()  # (tear the group down together, not while rank 0 still writes)
    dist.destroy_process_group()
    # gloo's threads can still be joinable when the interpreter tears itself down, and the
    # process then aborts ("terminate called without an active exception") after its work
    # is done and written; leave at once instead, with a clean exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(procs: list[int], jobs: list[tuple[str, str]], steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in procs:
            out = Path(tmp) / f"{size}.json"
            rdv = Path(tmp) / f"rdv{size}"
            mp.spawn(_worker, args=(size, str(rdv), str(out), jobs, steps), nprocs=size)
            for r in json.loads(out.read_text()):
                median = statistics.median(r["times"])
                rows.append({**r, "procs": size, "median_s": median})
    base = {(r["workload"], r["method"]): r for r in rows if r["procs"] == 1}
    for r in rows:
        r["tasks_per_s"] = META_BATCH / r["median_s"]
        one = base.get((r["workload"], r["method"]))
        if one is not None:
            r["efficiency"] = r["tasks_per_s"] / (r["procs"] * one["tasks_per_s"])
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | method | processes | s / meta-step | tasks / s | scaling efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff = f"{100 * r['efficiency']:.0f}%" if "efficiency" in r else "-"
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['procs']} | {r['median_s']:.4f} | "
            f"{r['tasks_per_s']:.1f} | {eff} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=["maml", "bayes"])
    p.add_argument("--workloads", nargs="+", default=["sinusoid", "conv4"])
    p.add_argument("--steps", type=int, default=8, help="timed meta-steps (after 2 warm-up)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if any(n < 1 for n in args.procs) or args.steps < 1:
        p.error("--procs and --steps must be positive")
    jobs = [(w, m) for w in args.workloads for m in args.methods]
    rows = run(args.procs, jobs, args.steps)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
