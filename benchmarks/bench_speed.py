"""Seconds and memory of a MAML meta-step: bayesmeta against a per-task loop, learn2learn and
higher (each when installed), alternated in one sitting.

    python benchmarks/bench_speed.py [--rounds 5] [--steps 5] [--threads default 1]
                                     [--workloads sinusoid-25 sinusoid-1 conv4-k1 conv4-k5]
                                     [--load] [--json PATH]

Workloads (second-order MAML, inner step size 0.01 (sinusoid) / 0.4 (Conv4), one outer Adam
step per meta-step):

- ``sinusoid-T``: MLP 1-40-40-1, ``T`` tasks of 10 support and 10 query points, 5 inner steps;
  bayesmeta's ``bayes`` too, as ``bayesmeta train`` builds it (mean-field Normal posteriors
  under a learned prior, natural steps, 2 antithetic posterior draws per step: twice maml's
  network work), and ``bayes1``, the same with one draw, maml's network work, so that its
  time over maml's is the guide's cost (at maml's inner step size 0.01); ``bayes-local``,
  ``bayes`` with ``guide="normal-local"`` (two antithetic draws of every layer's
  pre-activations);
- ``conv4-kK``: Conv4-64 (learn2learn's ``OmniglotCNN`` layout), 5-way 1-shot, 15 queries per
  class, 32 tasks of random 28 x 28 images, ``K`` inner steps; ``bayes`` and ``bayes1`` too
  (default step sizes). learn2learn and
  higher normalise each batch with its own statistics (their usual transductive batch norm);
  bayesmeta normalises with the support set's, which costs the same.

Each thread setting (torch's default, and 1) runs in its own process. In it, every round runs
``--steps`` meta-steps of each implementation in turn (after one warm-up round); the report is
the median seconds per meta-step over the rounds. Memory: each implementation runs one meta-step
in a fresh process, which resets the kernel's peak-RSS counter (Linux) after building its model
and tasks; "peak MiB" is the growth of the process's high-water mark over that point.
``--load`` keeps one other core busy meanwhile (a spinning process), as on a shared machine;
``--chunks 4 1`` adds bayesmeta's maml with those ``task_chunk`` settings (time against memory).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_memory import _rss_mb  # (the scripts of benchmarks/ run from there)
from torch import nn
from torch.nn import functional as F

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.runs import default_config, make_learner

IMPLS = (
    "bayesmeta",
    "bayesmeta-bayes",
    "bayesmeta-bayes1",
    "bayesmeta-bayes-local",
    "loop",
    "learn2learn",
    "higher",
)


# workloads ------------------------------------------------------------------------------
def _sinusoid(T: int, g: torch.Generator) -> TaskBatch:
    amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=g) * torch.pi
    x = torch.rand(T, 20, 1, generator=g) * 10 - 5
    y = amp * torch.sin(x + phase)
    return TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])


def _images(T: int, g: torch.Generator) -> TaskBatch:
    def part(per_class: int):
        x = torch.rand(T, 5 * per_class, 1, 28, 28, generator=g)
        return x, torch.arange(5).repeat_interleave(per_class).expand(T, -1).contiguous()

    return TaskBatch(*part(1), *part(15), num_classes=5)


def _parse(workload: str) -> tuple[str, int, int]:
    """(kind, tasks, inner steps) of a workload name."""
    kind, arg = workload.split("-")
    if kind == "sinusoid":
        return kind, int(arg), 5
    return kind, 32, int(arg.lstrip("k"))


def _torch_net(kind: str, transductive_bn: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "sinusoid":
        return nn.Sequential(
            nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
        )
    layers, channels = [], 1
    for _ in range(4):
        bn = nn.BatchNorm2d(64, track_running_stats=not transductive_bn)
        layers += [nn.Conv2d(channels, 64, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2)]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 5))


def _loss_fn(kind: str):
    return F.mse_loss if kind == "sinusoid" else F.cross_entropy


# implementations: each returns step(batch) -> None --------------------------------------
def _bayesmeta(
    kind: str,
    K: int,
    method: str,
    chunk: int | str | None = "auto",
    particles: int | None = None,
    guide: str | None = None,
):
    """maml as the peers run it (flat prior, the same step size); bayes as ``bayesmeta train``
    builds it by default (learned prior, natural steps), with ``K`` inner steps; with
    ``particles=1`` and, on sinusoids, maml's inner step size (see the module's docstring)."""
    if method == "bayes":
        given = {"method": "bayes", "inner_steps": K, "guide": guide}
        if particles is not None:
            given["particles"] = particles
            if kind == "sinusoid":
                given["inner_lr"] = 0.01
        if kind == "sinusoid":
            config = default_config({"task": "sinusoid", **given})
        else:
            config = default_config({"task": "omniglot", "hidden": "64", "augment": False, **given})
        learner = make_learner(config)
    else:
        torch.manual_seed(0)
        if kind == "sinusoid":
            net, lik, lr = bm.nets.MLP(1, [40, 40], 1), bm.models.Normal(0.3), 0.01
        else:
            net = bm.nets.Conv4(1, 5, hidden=64, image_size=28, norm="batch")
            lik, lr = bm.models.Categorical(), 0.4
        model = bm.models.HierarchicalBNN(net, lik, prior_scale=None)
        learner = bm.MetaLearner(model, method, inner_steps=K, inner_lr=lr, task_chunk=chunk)

    def step(batch):
        learner.meta_step(batch)

    return step


def _loop(kind: str, K: int):
    """The plain per-task loop: ``torch.func.functional_call`` and ``autograd.grad``."""
    net = _torch_net(kind, transductive_bn=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn, lr = _loss_fn(kind), 0.01 if kind == "sinusoid" else 0.4

    def step(batch):
        opt.zero_grad()
        T = batch.num_tasks
        for t in range(T):
            params = dict(net.named_parameters())
            for _ in range(K):
                out = torch.func.functional_call(net, params, (batch.support_x[t],))
                grads = torch.autograd.grad(
                    loss_fn(out, batch.support_y[t]), list(params.values()), create_graph=True
                )
                params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
            out = torch.func.functional_call(net, params, (batch.query_x[t],))
            (loss_fn(out, batch.query_y[t]) / T).backward()
        opt.step()

    return step


def _learn2learn(kind: str, K: int):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(
        _torch_net(kind, True), lr=0.01 if kind == "sinusoid" else 0.4, first_order=False
    )
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    loss_fn = _loss_fn(kind)

    def step(batch):
        opt.zero_grad()
        T = batch.num_tasks
        for t in range(T):
            learner = maml.clone()
            for _ in range(K):
                learner.adapt(loss_fn(learner(batch.support_x[t]), batch.support_y[t]))
            (loss_fn(learner(batch.query_x[t]), batch.query_y[t]) / T).backward()
        opt.step()

    return step


def _higher(kind: str, K: int):
    import higher

    net = _torch_net(kind, True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    inner = torch.optim.SGD(net.parameters(), lr=0.01 if kind == "sinusoid" else 0.4)
    loss_fn = _loss_fn(kind)

    def step(batch):
        opt.zero_grad()
        T = batch.num_tasks
        for t in range(T):
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(K):
                    diffopt.step(loss_fn(fnet(batch.support_x[t]), batch.support_y[t]))
                (loss_fn(fnet(batch.query_x[t]), batch.query_y[t]) / T).backward()
        opt.step()

    return step


def _available(impl: str) -> bool:
    module = {"learn2learn": "learn2learn", "higher": "higher"}.get(impl)
    if module is None:
        return True
    try:
        __import__(module)
    except Exception:  # (an install that fails to import counts as absent)
        return False
    return True


def _build(impl: str, kind: str, K: int):
    if impl == "bayesmeta":
        return _bayesmeta(kind, K, "maml")
    if impl.startswith("bayesmeta-chunk"):  # maml with another task_chunk (--chunks)
        return _bayesmeta(kind, K, "maml", chunk=int(impl.removeprefix("bayesmeta-chunk")))
    if impl == "bayesmeta-bayes":
        return _bayesmeta(kind, K, "bayes")
    if impl == "bayesmeta-bayes1":
        return _bayesmeta(kind, K, "bayes", particles=1)
    if impl == "bayesmeta-bayes-local":
        return _bayesmeta(kind, K, "bayes", guide="normal-local")
    return {"loop": _loop, "learn2learn": _learn2learn, "higher": _higher}[impl](kind, K)


def _batch(kind: str, T: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return _sinusoid(T, g) if kind == "sinusoid" else _images(T, g)


# measuring -------------------------------------------------------------------------------
def time_child(workloads: list[str], impls: list[str], rounds: int, steps: int) -> dict:
    """Alternate the implementations round by round; median seconds per meta-step."""
    out = {"threads": torch.get_num_threads(), "rows": []}
    for workload in workloads:
        kind, T, K = _parse(workload)
        batch = _batch(kind, T)
        steps_of = {impl: _build(impl, kind, K) for impl in impls}
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(rounds + 1):
            for impl, step in steps_of.items():
                start = time.perf_counter()
                for _ in range(steps):
                    step(batch)
                if r:  # round 0 warms up
                    times[impl].append((time.perf_counter() - start) / steps)
        for impl, ts in times.items():
            out["rows"].append(
                {
                    "workload": workload,
                    "impl": impl,
                    "median_s": statistics.median(ts),
                    "min_s": min(ts),
                    "max_s": max(ts),
                }  # fmt: skip
            )
    return out


def memory_child(workload: str, impl: str) -> dict:
    kind, T, K = _parse(workload)
    batch, step = _batch(kind, T), _build(impl, kind, K)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_mb("VmRSS")
    step(batch)
    return {"workload": workload, "impl": impl, "peak_mb": _rss_mb("VmHWM") - before}


def _child(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spin() -> None:
    torch.set_num_threads(1)
    while True:
        pass


def run(args: argparse.Namespace) -> list[dict]:
    impls = [i for i in IMPLS if _available(i)] + [f"bayesmeta-chunk{c}" for c in args.chunks]
    hog = None
    if args.load:
        hog = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
        hog.start()
    rows = []
    try:
        for threads in args.threads:
            res = _child(["time", threads, args.workloads, impls, args.rounds, args.steps])
            for r in res["rows"]:
                rows.append({**r, "threads": res["threads"], "threads_setting": threads})
        if args.memory:
            for workload in args.workloads:
                for impl in impls:
                    mem = _child(["memory", "1", workload, impl])
                    rows.append({**mem, "threads_setting": "memory"})
    finally:
        if hog is not None:
            hog.kill()
    return rows


def table(rows: list[dict]) -> str:
    timed = [r for r in rows if "median_s" in r]
    memory = {(r["workload"], r["impl"]): r["peak_mb"] for r in rows if "peak_mb" in r}

    def by(impl):
        return {(r["workload"], r["threads_setting"]): r for r in timed if r["impl"] == impl}

    base, maml = by("learn2learn"), by("bayesmeta")
    lines = [
        "| workload | threads | implementation | ms / meta-step (min-max) | learn2learn / it | "
        "it / bayesmeta maml | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in timed:
        key = (r["workload"], r["threads_setting"])
        ratio = f"{base[key]['median_s'] / r['median_s']:.2f}x" if key in base else "-"
        own = f"{r['median_s'] / maml[key]['median_s']:.2f}x" if key in maml else "-"
        mem = memory.get((r["workload"], r["impl"]))
        lines.append(
            f"| {r['workload']} | {r['threads']} ({r['threads_setting']}) | {r['impl']} | "
            f"{1e3 * r['median_s']:.1f} ({1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}) | "
            f"{ratio} | {own} | {'-' if mem is None else f'{mem:.0f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        what, threads, *rest = json.loads(sys.argv[2])
        if threads != "default":
            torch.set_num_threads(int(threads))
        bm.nets.keep_freed_memory()  # as the command line does; the peers share it
        out = time_child(*rest) if what == "time" else memory_child(*rest)
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="meta-steps per round")
    p.add_argument("--threads", nargs="+", default=["default", "1"])
    p.add_argument(
        "--workloads", nargs="+", default=["sinusoid-25", "sinusoid-1", "conv4-k1", "conv4-k5"]
    )
    p.add_argument(
        "--chunks", type=int, nargs="*", default=[], help="also bayesmeta maml at these task_chunk"
    )
    p.add_argument("--load", action="store_true", help="keep another core busy meanwhile")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = run(args)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
