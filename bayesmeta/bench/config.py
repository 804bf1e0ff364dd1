"""The benchmark suites as data: task families, per-family budgets, the speed grid.

A suite never holds code. :func:`bayesmeta.bench.suite.run_suite` reads a :class:`Suite` and runs
every (method, family) pair the same way; suites differ only in the numbers below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bayesmeta.runs import RUN_TASKS

__all__ = [
    "Family",
    "Budget",
    "SpeedGrid",
    "Suite",
    "SUITES",
    "SUITE_METHODS",
    "QUICK_METHODS",
    "NOT_ON",
    "METHOD_OPTIONS",
    "IMAGE_FAMILIES",
    "IMAGE_BUDGET",
    "SINUSOID_TRAIN_AMPLITUDE",
    "SINUSOID_OOD_AMPLITUDE",
]

#: The meta-learners a suite compares by default, in the order its report lists them (``map`` is
#: left out: it is ``bayes`` with a Delta guide). Every method is an entry of
#: :data:`bayesmeta.inference.METHODS`.
SUITE_METHODS = (
    "bayes-proto",
    "bayes-head",
    "bmaml",
    "bayes",
    "maml",
    "protomaml",
    "fomaml",
    "reptile",
    "metasgd",
    "anil",
)
#: The quick suite's: the Bayesian methods against the strongest point estimates (fomaml and
#: Reptile trail maml on images; docs/methods.md, "The other methods").
QUICK_METHODS = tuple(m for m in SUITE_METHODS if m not in ("fomaml", "reptile"))
_CLASSIFIER = "a classifier's head (class prototypes): there are no classes in regression"
#: Tasks a method is not run on in any suite, and why.
NOT_ON: dict[str, dict[str, str]] = {
    "bayes-proto": {"sinusoid": _CLASSIFIER},
    "protomaml": {"sinusoid": _CLASSIFIER},
}

#: Finn et al. (2017)'s amplitude range, used for meta-training and the in-range test.
SINUSOID_TRAIN_AMPLITUDE = (0.1, 5.0)
#: Amplitudes never seen in meta-training: the out-of-distribution test.
SINUSOID_OOD_AMPLITUDE = (5.0, 7.5)


@dataclass(frozen=True)
class Family:
    """One task family: what is meta-learned and how it is tested.

    Parameters
    ----------
    name : str
        Row label, e.g. ``"omniglot-5w1s"``.
    task : {"sinusoid", "omniglot", "images"}
        ``"images"`` is a class-per-folder image set (``--image-folder``).
    shots, queries : int
        ``K`` and ``Q`` (per class for classification).
    ways : int, optional
        ``N`` (classification only).
    within_alphabet : bool
        Omniglot: also test on tasks whose ``N`` characters all come from one unseen alphabet
        (Lake et al.'s protocol, for 20-way one-shot).
    """

    name: str
    task: str
    shots: int
    queries: int
    ways: int | None = None
    within_alphabet: bool = False


@dataclass(frozen=True)
class Budget:
    """How long a family is trained and how widely it is tested.

    Parameters
    ----------
    meta_steps, meta_batch : int
        Outer steps and ``T`` tasks per step.
    inner_steps : int
        Inner steps in meta-training; ``test_inner_steps`` at test time (default the same).
    hidden : str, optional
        Backbone width in ``bayesmeta train --hidden`` form (default: the CLI's).
    test_tasks : int
        Test tasks per evaluation (600 for a reported number; fewer is marked in the table).
    eval_batch : int
        Tasks adapted at once in evaluation.
    eval_particles : int, optional
        Predictive draws of methods with a Normal guide (``bayes``; default the learner's 16).
    particles : int, optional
        Draws per inner step in meta-training of methods with a Normal guide; overrides
        :data:`METHOD_OPTIONS` (default: theirs, else the learner's).
    meta_lr : float, optional
        Outer step size of the methods that use Adam (default the CLI's; Reptile keeps its own).
    lr_schedule : {"constant", "cosine"}
        The outer step size over the run (:meth:`bayesmeta.MetaLearner.fit`), every method's.
    """

    meta_steps: int
    meta_batch: int
    inner_steps: int
    test_inner_steps: int | None = None
    hidden: str | None = None
    test_tasks: int = 600
    eval_batch: int = 50
    eval_particles: int | None = None
    particles: int | None = None
    meta_lr: float | None = None
    lr_schedule: str = "constant"


@dataclass(frozen=True)
class SpeedGrid:
    """Meta-training throughput: the batched inner loop against the per-task loop.

    Every combination of ``tasks`` × ``num_tasks`` (T) × ``inner_steps`` × ``first_order`` is
    timed with :func:`bayesmeta.bench.speed.time_meta_steps` (median of ``repeats`` interleaved
    calls after ``warmup``). At ``T = cost_tasks`` each of ``cost_methods`` is also timed as the
    suite trains it (its options and the family's budget), against maml. ``widths``: the
    timed network's width by run task, in ``--hidden`` form (:meth:`width`).
    """

    tasks: tuple[str, ...] = ("sinusoid", "omniglot")
    num_tasks: tuple[int, ...] = (1, 8, 32)
    inner_steps: tuple[int, ...] = (1, 5)
    first_order: tuple[bool, ...] = (False, True)
    repeats: int = 3
    warmup: int = 1
    widths: dict[str, str] = field(default_factory=dict)
    cost_methods: tuple[str, ...] = ("maml", "bayes", "bayes-head", "bmaml", "bayes-proto")
    cost_tasks: int = 8

    def width(self, run_task: str) -> str:
        """The width the grid times ``run_task``'s network at: ``widths``' entry, else the
        task's default (:attr:`~bayesmeta.runs.RunTask.defaults`)."""
        return self.widths.get(run_task) or RUN_TASKS[run_task].defaults["hidden"]


@dataclass(frozen=True)
class Suite:
    """A named benchmark: families with their budgets, the speed grid and the data source.

    Parameters
    ----------
    omniglot : {"small", "full"}
        ``"small"``: Lake's small background zips from the data root (nothing downloaded);
        ``"full"``: torchvision's full Omniglot, downloaded into the data root.
    held_out_fraction : float
        Share of the train alphabets' characters kept out of meta-training: the "seen
        alphabets" test draws its tasks from them.
    time_budget_s : float, optional
        Wall time the suite is meant to fit on a 2-core CPU (recorded, never enforced).
    methods : tuple of str
        The methods it compares by default (each skips the tasks :data:`NOT_ON` names).
    skip : dict
        ``{method: {task: reason}}`` this suite does not run, besides :data:`NOT_ON`.
    image_folder : str, optional
        The class-per-folder image set that its image-folder families read
        (:meth:`with_image_folder`).
    """

    name: str
    description: str
    families: tuple[Family, ...]
    budgets: dict[str, Budget]
    speed: SpeedGrid | None = None
    omniglot: str = "small"
    held_out_fraction: float = 0.2
    time_budget_s: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    methods: tuple[str, ...] = SUITE_METHODS
    skip: dict[str, dict[str, str]] = field(default_factory=dict)
    image_folder: str | None = None

    def with_image_folder(self, folder: str | Path) -> Suite:
        """This suite with the 5-way 1- and 5-shot families of the class-per-folder image set
        in ``folder`` added (:data:`IMAGE_FAMILIES`, on :data:`IMAGE_BUDGET`)."""
        budgets = {**self.budgets, **{f.name: IMAGE_BUDGET for f in IMAGE_FAMILIES}}
        return replace(
            self,
            families=self.families + IMAGE_FAMILIES,
            budgets=budgets,
            image_folder=str(folder),
        )

    def not_run(self, method: str, task: str) -> str | None:
        """Why ``method`` does not run on ``task`` in this suite (``None``: it does)."""
        return self.skip.get(method, {}).get(task) or NOT_ON.get(method, {}).get(task)


#: ``bayes`` on sinusoids: the local reparameterisation (two antithetic draws of each point's
#: pre-activations) with natural steps of 0.03, the learner's default. With weight draws
#: natural steps diverged at this budget (seed 0: 20 and 127 non-finite meta-steps), and at
#: the CLI's 0.1 local draws did at 5 shots (seed 1); plain steps with one draw trained, to
#: MSE 1.26 / 0.77 and 90% coverage 0.56 / 0.67 at 5 / 10 shots (docs/methods.md, "Local
#: reparameterisation").
_BAYES_SINE = {"guide": "normal-local", "inner_lr": 0.03}
#: ``bayes-head`` on images: three Newton steps to the Laplace posterior of the classifier,
#: from a wide prior (σ = 1 on the zero head; 0.3 learned more slowly), eight draws per query
#: in meta-training. On sinusoids its Gaussian head is exact and needs no options.
_BAYES_HEAD_IMAGES = {
    "inner_steps": 3,
    "test_inner_steps": 3,
    "particles": 8,
    "prior_scale": 1.0,
}
#: ``bmaml`` on images moves five particles of the head on a shared body (five of the whole
#: Conv4 cost five maml rows), drawn with a spread of σ = 0.01 around μ, with MAML's step:
#: wider spreads under the learned prior started the draws too far apart and learned far less
#: (docs/methods.md, "bmaml: Stein particles").
_BMAML_IMAGES = {"adapt": "head", "prior_scale": 0.01, "inner_lr": 0.4, "particles": 5}
#: ``reptile`` on images takes three inner steps, in training and at test: with one step its
#: direction is the gradient of the task loss at μ, i.e. joint training on labels that every
#: task permutes afresh, and it stays at chance. Each step trains on its own third of the
#: points (``bayesmeta.inference.outer._reptile_batches``), and its ε is annealed on the
#: cosine, as Nichol et al. anneal theirs: a constant ε drifted back to chance at the
#: standard budget.
_REPTILE_IMAGES = {"inner_steps": 3, "test_inner_steps": 3, "lr_schedule": "cosine"}
#: Per-method, per-task settings over the CLI's defaults (``bayesmeta train``) and the budget.
METHOD_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "bayes": {"sinusoid": _BAYES_SINE},
    "bayes-head": {"omniglot": _BAYES_HEAD_IMAGES, "images": _BAYES_HEAD_IMAGES},
    "bmaml": {"omniglot": _BMAML_IMAGES, "images": _BMAML_IMAGES},
    "reptile": {"omniglot": _REPTILE_IMAGES, "images": _REPTILE_IMAGES},
}

_SINE = (Family("sinusoid-5shot", "sinusoid", 5, 10), Family("sinusoid-10shot", "sinusoid", 10, 10))
#: Two query images per class in 20-way quick tasks keep evaluation within the quick budget
#: (40 query points per task, 600 tasks per condition).
_OMNI_QUICK = (
    Family("omniglot-5w1s", "omniglot", 1, 5, ways=5),
    Family("omniglot-20w1s", "omniglot", 1, 2, ways=20, within_alphabet=True),
)
_OMNI_FULL = (
    Family("omniglot-5w1s", "omniglot", 1, 15, ways=5),
    Family("omniglot-5w5s", "omniglot", 5, 15, ways=5),
    Family("omniglot-20w1s", "omniglot", 1, 5, ways=20, within_alphabet=True),
    Family("omniglot-20w5s", "omniglot", 5, 5, ways=20, within_alphabet=True),
)
#: Families added by ``--image-folder`` (e.g. miniImageNet, 84 x 84 RGB).
IMAGE_FAMILIES = (
    Family("images-5w1s", "images", 1, 15, ways=5),
    Family("images-5w5s", "images", 5, 15, ways=5),
)
IMAGE_BUDGET = Budget(60000, 4, 5, 10, hidden="32", test_tasks=600, eval_batch=20)


def _same(families: tuple[Family, ...], budget: Budget) -> dict[str, Budget]:
    return {f.name: budget for f in families}


SUITES: dict[str, Suite] = {
    "smoke": Suite(
        name="smoke",
        description="seconds; checks the plumbing (tests), numbers mean nothing",
        families=(_SINE[0], replace(_OMNI_QUICK[0], within_alphabet=True)),
        budgets={
            "sinusoid-5shot": Budget(2, 2, 1, hidden="8", test_tasks=6, eval_batch=3),
            "omniglot-5w1s": Budget(2, 2, 1, hidden="4", test_tasks=4, eval_batch=2),
        },
        speed=SpeedGrid(
            num_tasks=(1, 2),
            inner_steps=(1,),
            first_order=(False,),
            repeats=1,
            warmup=0,
            widths={"sinusoid": "8", "omniglot": "4"},
            cost_tasks=2,
        ),
        time_budget_s=60,
    ),
    "quick": Suite(
        name="quick",
        description="aimed at 30 minutes on a 2-core CPU, two rows at a time, nothing "
        "downloaded: Lake's small Omniglot background sets, Conv4-32, augmented "
        "meta-training; the Bayesian methods against the strongest point estimates",
        families=_SINE + _OMNI_QUICK,
        methods=QUICK_METHODS,
        skip={
            "bmaml": {
                "sinusoid": "five particles of the whole MLP cost about seven maml rows; the "
                "standard suite runs them"
            }
        },
        # Sizes from single rows (docs/methods.md, "Measured choices behind the defaults"):
        # on Omniglot a cosine schedule from 6e-3 gets as far in 800 steps as a constant rate
        # in far more, longer runs gain little for any method, and a smaller meta-batch did
        # worse per task seen: 800 steps keep the best 5-way method near its peak within the
        # suite's time budget, and 20-way's 300 beat 200. The sinusoid keeps a constant rate
        # of 3e-3 (1e-3 was far slower and cosine barely helped), with 10 shots still gaining
        # up to 4000 steps.
        budgets={
            "sinusoid-5shot": Budget(2000, 25, 5, hidden="40,40", meta_lr=3e-3),
            "sinusoid-10shot": Budget(4000, 25, 5, hidden="40,40", meta_lr=3e-3),
            "omniglot-5w1s": Budget(
                800, 8, 1, hidden="32", eval_particles=4, meta_lr=6e-3, lr_schedule="cosine"
            ),
            "omniglot-20w1s": Budget(
                300, 4, 1, hidden="32", eval_particles=4, meta_lr=6e-3, lr_schedule="cosine"
            ),
        },
        # T = 32 is timed by the standard suite: its Conv4 cells cost minutes each.
        speed=SpeedGrid(num_tasks=(1, 8), repeats=3),
        time_budget_s=1800,
    ),
    "standard": Suite(
        name="standard",
        description="the quick families trained longer (aimed at 2 hours on a 2-core CPU; "
        "its last record is in docs/benchmarks.md)",
        families=_SINE + _OMNI_QUICK,
        # At a constant step size (run before the quick suite's cosine schedule): 4000 / 2000
        # Omniglot steps (5-way / 20-way; maml kept improving past the quick suite's budget
        # once meta-training was augmented), 5x / 2.5x the quick sinusoid's (5 / 10 shots).
        # The quick suite's cosine schedule did worse at these budgets, and twice the Omniglot
        # steps did not pay (docs/methods.md, "Measured choices behind the defaults").
        budgets={
            **_same(_SINE, Budget(10000, 25, 5, hidden="40,40", meta_lr=3e-3)),
            "omniglot-5w1s": Budget(4000, 8, 1, hidden="32", meta_lr=3e-3),
            "omniglot-20w1s": Budget(2000, 4, 1, hidden="32", meta_lr=3e-3),
        },
        speed=SpeedGrid(repeats=5),
        time_budget_s=7200,
    ),
    "full": Suite(
        name="full",
        description="Finn et al. (2017)'s protocol, for a GPU: full Omniglot (downloaded), "
        "5/20-way 1/5-shot, Conv4 with 64 channels, 60k meta-steps; sinusoid 70k steps",
        families=_SINE + _OMNI_FULL,
        budgets={
            **_same(_SINE, Budget(70000, 25, 5, 10, hidden="40,40")),
            "omniglot-5w1s": Budget(60000, 32, 1, 3, hidden="64"),
            "omniglot-5w5s": Budget(60000, 32, 1, 3, hidden="64"),
            "omniglot-20w1s": Budget(60000, 16, 5, 5, hidden="64", eval_batch=25),
            "omniglot-20w5s": Budget(60000, 16, 5, 5, hidden="64", eval_batch=25),
        },
        speed=SpeedGrid(repeats=10, widths={"omniglot": "64"}),
        omniglot="full",
        notes=(
            "Omniglot is split by alphabet (30/8/12 of 50, as in Lake et al.); Finn et al. split "
            "by character, so their test characters mostly come from seen alphabets, like the "
            "'seen alphabets' column here",
        ),
    ),
}
