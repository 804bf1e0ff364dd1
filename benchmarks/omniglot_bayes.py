"""bayes on Omniglot's Conv4 against maml and map, each with its library defaults.

    python benchmarks/omniglot_bayes.py [--steps 100] [--seeds 0,1,2] [--test-tasks 200]
        [--methods maml,map,bayes] [--guide NAME]

5-way 1-shot on Lake's packaged background sets (test tasks from the held-out alphabets), the
default ``Conv4(1, ways=5)`` and model (its prior: a tenth of each body tensor's initial RMS,
0.1 on the head; maml's is flat), meta-batches of 4 tasks. For ``bayes`` it also prints the
adapted posterior's σ over the prior's, averaged per weight tensor (1 where the inner loop
leaves the widths at the prior), so that a point mass cannot hide. ``--guide`` gives ``bayes``
another guide (e.g. ``normal-local``). One line per seed and method; figures in
docs/methods.md.
"""

from __future__ import annotations

import argparse
import time

import torch

import bayesmeta as bm
from bayesmeta.data import Omniglot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--methods", default="maml,map,bayes")
    parser.add_argument("--guide", default=None, help="bayes's guide (default: the method's)")
    args = parser.parse_args()
    train, test = Omniglot(split="train", queries=5), Omniglot(split="test", queries=5)
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            torch.manual_seed(seed)
            model = bm.models.HierarchicalBNN(bm.nets.Conv4(1, ways=5), bm.models.Categorical())
            given = {"guide": args.guide} if args.guide and method == "bayes" else {}
            learner = bm.MetaLearner(model, method, **given)
            start = time.perf_counter()
            learner.fit(train, args.steps, meta_batch=4, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            scores = bm.evaluate(learner, test, num_tasks=args.test_tasks, seed=100 + seed)
            line = (
                f"seed {seed} {method:5s} acc {scores['accuracy']:.4f} nll {scores['nll']:.4f} "
                f"ece {scores['ece']:.4f} train {seconds:.0f} s"
            )
            if method == "bayes":
                line += f" posterior/prior sigma {_width_ratio(learner, test):.3f}"
            print(line, flush=True)


def _width_ratio(learner: bm.MetaLearner, tasks) -> float:
    """The adapted σ over the prior σ, averaged per weight tensor, on 20 test tasks."""
    batch = tasks.sample(20, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(6)
    post = learner.adapt(batch.support_x, batch.support_y, generator=generator)
    ratios = [float(r.mean()) for r in post.width_ratio().values()]
    return sum(ratios) / len(ratios)


if __name__ == "__main__":
    main()
