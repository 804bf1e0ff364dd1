"""Meta-training tasks per second: batched inner loop vs a learn2learn-style per-task loop.

    python benchmarks/bench_inner_loop.py [--repeats 5] [--omniglot-root PATH] [--memory]

Sinusoid (MLP 1-40-40-1, T=25, K=10, 5 inner steps, second order) and Omniglot (Conv4,
T=32, 5-way 1-shot, 15 queries, 1 and 5 inner steps) for ``maml`` and ``bayes``; with
``--memory``, peak resident memory of one meta-step against inner steps (first and second
order), each configuration in its own process (Linux: reads VmHWM after resetting it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from bench_memory import _rss_mb  # (the scripts of benchmarks/ run from there)

import bayesmeta as bm
from bayesmeta.bench.speed import per_task_meta_step, time_meta_steps
from bayesmeta.data import Omniglot, Sinusoid, packaged_omniglot_root

DEFAULT_ROOT = packaged_omniglot_root()  # Lake's small background sets, in the package


def _learner(task: str, method: str, steps: int, particles: int | None = None, hidden: int = 64):
    torch.manual_seed(0)
    if task == "sinusoid":
        net, lik, lr = bm.nets.MLP(1, [40, 40], 1), bm.models.Normal(1.0), 0.01
    else:
        net, lik, lr = bm.nets.Conv4(1, 5, hidden=hidden), bm.models.Categorical(), 0.4
    model = bm.models.HierarchicalBNN(net, lik, prior_scale=0.1)
    return bm.MetaLearner(model, method, inner_steps=steps, inner_lr=lr, particles=particles)


def speed_rows(root: Path, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    configs = [("sinusoid", Sinusoid(10, 10).sample(25, generator=g), 5)]
    if root.exists():
        omni = Omniglot(root, ways=5, shots=1, queries=15, split="train")
        batch = omni.sample(32, generator=g)
        configs += [("omniglot", batch, 1), ("omniglot", batch, 5)]
    rows = []
    for task, batch, steps in configs:
        reps = repeats if task == "sinusoid" else max(1, repeats // 2)
        base = _learner(task, "maml", steps)
        maml = _learner(task, "maml", steps)
        bayes = _learner(task, "bayes", steps, particles=4)
        bayes2 = _learner(task, "bayes", steps, particles=2)
        bayes1 = _learner(task, "bayes", steps, particles=1)
        secs = time_meta_steps(
            {
                "per-task loop (maml)": partial(per_task_meta_step, base, batch),
                "batched maml": partial(maml.meta_step, batch, g),
                "batched bayes P=4": partial(bayes.meta_step, batch, g),
                "batched bayes P=2": partial(bayes2.meta_step, batch, g),
                "batched bayes P=1": partial(bayes1.meta_step, batch, g),
            },
            repeats=reps,
        )
        ref = secs["per-task loop (maml)"]
        for name, s in secs.items():
            rows.append(
                {
                    "task": task,
                    "T": batch.num_tasks,
                    "inner_steps": steps,
                    "learner": name,
                    "ms_per_step": 1e3 * s,
                    "tasks_per_s": batch.num_tasks / s,
                    "speedup_vs_loop": ref / s,
                    "vs_batched_maml": s / secs["batched maml"],
                }
            )
    return rows


def _peak_memory_child(task: str, first_order: bool, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    if task == "sinusoid":
        batch = Sinusoid(10, 10).sample(25, generator=g)
    else:
        batch = Omniglot(DEFAULT_ROOT, 5, 1, 15, split="train").sample(8, generator=g)
    learner = _learner(task, "fomaml" if first_order else "maml", steps)
    # No warm-up: a second step would reuse the heap the first one grew. ru_maxrss survives
    # fork and exec (a child inherits its parent's high-water mark), so reset
    # the kernel's peak-RSS counter (VmHWM) and read it back after one meta-step.
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mb("VmRSS")
    learner.meta_step(batch, g)
    peak = _rss_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "step_mb": peak - before}))


def memory_rows(task: str) -> list[dict]:
    rows = []
    for first_order in (False, True):
        for steps in (1, 2, 4, 8):
            here = str(Path(__file__).parent)
            code = (
                f"import sys; sys.path.insert(0, {here!r}); import bench_inner_loop as b; "
                f"b._peak_memory_child({task!r}, {first_order!r}, {steps})"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"task": task, "first_order": first_order, "inner_steps": steps, **rec})
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--omniglot-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if args.memory:
        print(_table(memory_rows("sinusoid") + memory_rows("omniglot")))
        print()
    print(_table(speed_rows(args.omniglot_root, args.repeats)))


if __name__ == "__main__":
    main()
