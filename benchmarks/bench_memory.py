"""Peak resident memory of an Omniglot 20-way meta-step against the task chunk.

    python benchmarks/bench_memory.py [--omniglot-root PATH] [--meta-batch 32] [--steps 1]
                                      [--chunks 8 auto] [--ways 20] [--method bayes]

The learner is what ``bayesmeta train --task omniglot --ways 20`` builds by default (Conv4-32 on
28 x 28 images, 1 shot, 15 queries per class, 5 inner steps, 4 particles for ``bayes``). Each
task chunk runs in a fresh process, which resets the kernel's peak-RSS counter (VmHWM, Linux)
after building the learner and drawing the meta-batch, then runs ``--steps`` meta-steps and reads
the peak back: "peak" is the process's high-water mark (torch and the decoded images included),
"step" its growth over the resident size before the first step. ``8`` is what ``"auto"`` chose
on a CPU before the memory budget (:data:`bayesmeta.nets.memory.TASK_MEMORY_BUDGET_MB`);
``auto`` is what it chooses now. On this 2-core CPU (1 thread, busy with another benchmark):

    | task_chunk | tasks per backward pass | peak RSS (MiB) | growth (MiB) | s / step |
    |---|---|---|---|---|
    | 8 | 8 | 7838 | 7113 | 98.4 |
    | auto | 2 | 2723 | 1998 | 62.2 |
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import bayesmeta as bm
from bayesmeta.data import Omniglot, packaged_omniglot_root

DEFAULT_ROOT = packaged_omniglot_root()  # Lake's small background sets, in the package


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _learner(method: str, ways: int, chunk: int | str | None) -> bm.MetaLearner:
    """``bayesmeta train``'s default Omniglot learner (its defaults, written out)."""
    torch.manual_seed(0)
    net = bm.nets.Conv4(1, ways, hidden=32, image_size=28, zero_head=True, norm="batch")
    model = bm.models.HierarchicalBNN(net, bm.models.Categorical(), prior_scale=0.1)
    spec = bm.inference.METHODS[method]
    inner_lr = 0.5 if spec.update == "natural" else 0.4 if spec.flat_prior else 0.01
    return bm.MetaLearner(model, method, inner_steps=5, inner_lr=inner_lr, task_chunk=chunk)


def child(root: Path, method: str, ways: int, meta_batch: int, steps: int, chunk: str) -> None:
    chunk_arg: int | str | None = None if chunk == "none" else chunk
    if chunk == "auto":
        bm.nets.keep_freed_memory()  # what "auto" is measured with: the command line's setting
    if chunk not in ("auto", "none"):
        chunk_arg = int(chunk)
    tasks = Omniglot(root, ways=ways, shots=1, queries=15, split="train")
    g = torch.Generator().manual_seed(0)
    batch = tasks.sample(meta_batch, generator=g)
    learner = _learner(method, ways, chunk_arg)
    used = learner.chunk_size(batch)
    # ru_maxrss survives fork and exec; VmHWM can be reset (Linux), so each row is its own.
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        learner.meta_step(batch, g)
    seconds = (time.perf_counter() - start) / steps
    peak = _rss_mb("VmHWM")
    row = {"chunk": chunk, "tasks_per_pass": used, "peak_mb": peak, "step_mb": peak - before}
    print(json.dumps({**row, "s_per_step": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--method", default="bayes")
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--chunks", nargs="+", default=["8", "auto"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", metavar="CHUNK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        child(args.omniglot_root, args.method, args.ways, args.meta_batch, args.steps, args.child)
        return
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); {args.method}, Omniglot "
        f"{args.ways}-way 1-shot, 15 queries, meta-batch {args.meta_batch}, {args.steps} step(s)"
    )
    print("| task_chunk | tasks per backward pass | peak RSS (MiB) | growth (MiB) | s / step |")
    print("|---|---|---|---|---|")
    for chunk in args.chunks:
        argv = [sys.executable, __file__, "--child", chunk, "--omniglot-root"]
        argv += [str(args.omniglot_root), "--method", args.method, "--ways", str(args.ways)]
        argv += ["--meta-batch", str(args.meta_batch), "--steps", str(args.steps)]
        argv += ["--threads", str(args.threads)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {row['chunk']} | {row['tasks_per_pass']} | {row['peak_mb']:.0f} | "
            f"{row['step_mb']:.0f} | {row['s_per_step']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
