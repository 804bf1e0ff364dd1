"""``bayes`` with every default on the sinusoid MLP, against ``bayes-head`` on the same model.

    python benchmarks/bayes_defaults.py [--steps 1000] [--seeds 0,1,2,3,4] [--test-tasks 200]
        [--guide NAME] [--methods bayes,bayes-head]

``MetaLearner(HierarchicalBNN(MLP(1, [40, 40], 1), Normal(0.3)), method)`` with nothing else
set, on ``Sinusoid(shots=10, queries=10, noise=0.3)``, meta-batches of 25 tasks. Non-finite
meta-steps are skipped and counted (``fit(skip_nonfinite=True)``). One line per seed and
method: skipped steps, test MSE and NLL on fresh tasks, seconds per meta-step; then the mean
over seeds and bayes's MSE over bayes-head's. For bayes it also prints the learned prior σ and
the adapted σ over it (``TaskPosterior.width_ratio``), each averaged per weight tensor.
``--guide`` gives ``bayes`` another guide (e.g. ``normal-local``), everything else left at its
default. Figures in docs/methods.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bayesmeta as bm
from bayesmeta.data import Sinusoid

METHODS = ("bayes", "bayes-head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--guide", default=None, help="bayes's guide (default: the method's)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    tasks = Sinusoid(shots=10, queries=10, noise=0.3)
    mse: dict[str, list[float]] = {m: [] for m in methods}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in methods:
            torch.manual_seed(seed)
            net = bm.nets.MLP(1, [40, 40], 1)
            model = bm.models.HierarchicalBNN(net, bm.models.Normal(0.3))
            given = {"guide": args.guide} if args.guide and method == "bayes" else {}
            learner = bm.MetaLearner(model, method, **given)
            start = time.perf_counter()
            learner.fit(
                tasks, args.steps, meta_batch=25, seed=seed, progress=False, skip_nonfinite=True
            )
            per_step = (time.perf_counter() - start) / args.steps
            scores = bm.evaluate(learner, tasks, num_tasks=args.test_tasks, seed=100 + seed)
            mse[method].append(scores["mse"])
            line = (
                f"seed {seed} {method:10s} skipped {learner.skipped_steps} mse {scores['mse']:.3f} "
                f"nll {scores['nll']:.3f} {1000 * per_step:.1f} ms/step"
            )
            if method == "bayes":
                line += _widths(learner, tasks)
            print(line, flush=True)
    means = {m: statistics.mean(v) for m, v in mse.items()}
    print(" ".join(f"{m} mean mse {v:.3f}" for m, v in means.items()))
    if set(METHODS) <= set(means):
        print(f"bayes / bayes-head mse {means['bayes'] / means['bayes-head']:.2f}")


def _widths(learner: bm.MetaLearner, tasks) -> str:
    """The learned prior σ and the adapted σ over it on 20 test tasks, each averaged per weight
    tensor."""
    batch = tasks.sample(20, torch.Generator().manual_seed(5))
    post = learner.adapt(
        batch.support_x, batch.support_y, generator=torch.Generator().manual_seed(6)
    )
    prior = [float(s.detach().mean()) for s in learner.model.prior_scale().values()]
    ratio = [float(r.mean()) for r in post.width_ratio().values()]
    return f" prior sigma {statistics.mean(prior):.3f} posterior/prior {statistics.mean(ratio):.3f}"


if __name__ == "__main__":
    main()
