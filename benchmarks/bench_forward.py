"""Time the task-batched forward against a per-task loop of ordinary module forwards.

Run ``python benchmarks/bench_forward.py [--repeats R] [--tasks 1 8 32]``. Every candidate
and its baseline run interleaved in the same loop (the machine is noisy), and the median over
``R`` repeats is reported as a Markdown table in milliseconds, with speed-ups over the baseline.

Baseline: ``torch.func.functional_call(net, params[t], x[t])`` for each task ``t``, stacked.
Modes: ``forward`` (parameters require grad, as in training) and ``fwd+bwd`` (plus the
gradient of a scalar loss with respect to every task's parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from bayesmeta.nets import MLP, Conv4, batched_forward

Forward = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def per_task_loop(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor):
    """Baseline: one module forward per task; params ``[T, ...]``, x ``[T, B, ...]``."""
    outs = [
        functional_call(net, {k: v[t] for k, v in params.items()}, (x[t],))
        for t in range(x.shape[0])
    ]
    return torch.stack(outs)


def batched(kernel: str) -> Forward:
    def run(net, params, x):
        return batched_forward(net, params, x, kernel=kernel)

    return run


def task_params(net: nn.Module, tasks: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-task weights ``[T, *shape]``: the net's weights plus task-specific noise."""
    return {
        name: (p.detach() + 0.01 * torch.randn(tasks, *p.shape, generator=gen)).requires_grad_()
        for name, p in net.named_parameters()
    }


def time_once(fn: Forward, net, params, x, backward: bool, clock: Callable[[], float]) -> float:
    start = clock()
    out = fn(net, params, x)
    if backward:
        torch.autograd.grad(out.square().mean(), list(params.values()))
    return clock() - start


def measure(
    variants: dict[str, Forward], net, params, x, repeats: int, clock: Callable[[], float]
) -> dict[tuple[str, str], float]:
    """Median milliseconds per (variant, mode), with all variants interleaved per repeat."""
    samples: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats + 1):  # repeat 0 warms up caches and allocators
        for mode, backward in (("forward", False), ("fwd+bwd", True)):
            for name, fn in variants.items():
                dt = time_once(fn, net, params, x, backward, clock)
                if rep:
                    samples.setdefault((name, mode), []).append(dt)
    return {key: 1e3 * statistics.median(v) for key, v in samples.items()}


def table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32], help="values of T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (steadier when shared; use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
        f"{args.clock} clock, median of {args.repeats} repeats (ms)\n"
    )

    cases = [
        ("MLP(1,[40,40],1), B=10", MLP(1, [40, 40], 1), (10, 1), {}),
        (
            "Conv4(1,5,64,28), B=80",
            Conv4(1, 5, hidden=64, image_size=28),
            (80, 1, 28, 28),
            {"loop": batched("loop"), "grouped": batched("grouped"), "vmap": batched("vmap")},
        ),
    ]
    main_rows, kernel_rows = [], []
    for label, net, in_shape, kernels in cases:
        for tasks in args.tasks:
            params = task_params(net, tasks, gen)
            x = torch.randn(tasks, *in_shape, generator=gen)
            variants = {"per-task": per_task_loop, "batched": batched("auto"), **kernels}
            ms = measure(variants, net, params, x, args.repeats, clock)
            for mode in ("forward", "fwd+bwd"):
                base, cand = ms["per-task", mode], ms["batched", mode]
                main_rows.append(
                    [label, str(tasks), mode, f"{base:.2f}", f"{cand:.2f}", f"{base / cand:.2f}x"]
                )
                if kernels:
                    ref = ms["loop", mode]
                    kernel_rows.append(
                        [str(tasks), mode]
                        + [f"{ms[k, mode]:.1f} ({ref / ms[k, mode]:.2f}x)" for k in kernels]
                    )
    print(
        table(
            "batched_forward (auto kernel) vs per-task loop",
            ["model", "T", "mode", "per-task ms", "batched ms", "speed-up"],
            main_rows,
        )
    )
    print()
    print(
        table(
            "Conv4 kernels, ms (speed-up over the loop kernel)",
            ["T", "mode", "loop", "grouped", "vmap"],
            kernel_rows,
        )
    )


if __name__ == "__main__":
    main()
