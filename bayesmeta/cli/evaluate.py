"""``bayesmeta eval``: score a trained run on held-out tasks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

import bayesmeta as bm
from bayesmeta.cli._folders import FolderLock, record_files
from bayesmeta.cli._processes import add_dist_timeout
from bayesmeta.inference.distributed import world
from bayesmeta.runs import UsageError, load_run, make_tasks, write_json

__all__ = ["add_parser", "run", "format_metrics"]

EVAL_NAME = "eval.json"
#: Default seed of the test tasks; not the training seed, so they are fresh draws.
EVAL_SEED = 1000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a run on held-out tasks",
        description="Adapt the run's learner to held-out tasks (the test split for Omniglot) and "
        "print accuracy ± 95% CI, NLL, ECE, MCE and Brier (classification) or MSE ± CI, NLL, "
        "interval coverage and CRPS (regression). Writes RUN_DIR/eval.json.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by bayesmeta train")
    p.add_argument("--num-tasks", type=int, default=600, help="test tasks (default 600)")
    p.add_argument("--meta-batch", type=int, default=50, help="tasks adapted at once (default 50)")
    p.add_argument(
        "--seed", type=int, default=EVAL_SEED, help=f"seed of the test tasks (default {EVAL_SEED})"
    )
    p.add_argument("--data-root", metavar="PATH", help="omniglot folder (default: the run's)")
    p.add_argument(
        "--threads", type=int, metavar="N", help="torch.set_num_threads(N) [torch's default]"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dist_timeout(p)
    p.set_defaults(func=run)


def format_metrics(metrics: Mapping[str, float]) -> list[str]:
    """Human-readable lines of :func:`bayesmeta.evaluate`'s scores (accuracy as a percentage)."""
    lines = []
    if "accuracy" in metrics:
        lines.append(
            f"accuracy  {100 * metrics['accuracy']:.2f}% ± {100 * metrics['accuracy_ci']:.2f} "
            "(95% CI over tasks)"
        )
        lines.append(f"NLL       {metrics['nll']:.4f}")
        lines.append(f"ECE       {metrics['ece']:.4f}  (15 bins; MCE {metrics['mce']:.4f})")
        lines.append(f"Brier     {metrics['brier']:.4f}")
    else:
        mse, ci = metrics["mse"], metrics["mse_ci"]
        lines.append(f"MSE       {mse:.4f} ± {ci:.4f} (95% CI over tasks)")
        lines.append(f"NLL       {metrics['nll']:.4f}")
        cov = [k for k in metrics if k.startswith("coverage_")]
        text = ", ".join(f"{k.split('_')[1]}%: {metrics[k]:.3f}" for k in cov)
        lines.append(f"coverage  {text}  (central predictive intervals)")
        if "crps" in metrics:
            lines.append(f"CRPS      {metrics['crps']:.4f}")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.num_tasks < 1 or args.meta_batch < 1:
        raise UsageError("--num-tasks and --meta-batch must be positive ints")
    run_dir, config, learner = load_run(args.run_dir)
    if args.data_root:
        config["data_root"] = args.data_root
    tasks = make_tasks(config, "test")
    if world()[0] != 0:  # under torchrun: score this rank's share; rank 0 writes and prints
        _score(args, run_dir, learner, tasks)
        return 0
    with FolderLock(run_dir):  # (fails now if eval.json could not be written)
        return _evaluate(args, run_dir, config, learner, tasks)


def _score(args: argparse.Namespace, run_dir, learner, tasks) -> bm.Evaluation:
    try:
        return bm.evaluate(
            learner,
            tasks,
            num_tasks=args.num_tasks,
            meta_batch=args.meta_batch,
            seed=args.seed,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except (ValueError, FloatingPointError) as err:  # e.g. an adaptation that diverged
        raise UsageError(f"cannot evaluate {run_dir}: {str(err).splitlines()[0][:300]}") from err


def _evaluate(args: argparse.Namespace, run_dir, config, learner, tasks) -> int:
    metrics = _score(args, run_dir, learner, tasks)
    print(
        f"{run_dir}: {config['task']}/{config['method']}, {args.num_tasks} test tasks "
        f"(seed {args.seed})"
    )
    for line in format_metrics(metrics):
        print(line)
    record_files(run_dir, EVAL_NAME)
    write_json(run_dir / EVAL_NAME, {**metrics.to_dict(), "seed": args.seed})
    print(f"wrote {run_dir / EVAL_NAME}")
    return 0
