"""Every method trains as constructed: ``MetaLearner(model, method)`` with nothing else set.

The matrix of the defaults: each method of the method table, on the sinusoid MLP at noise 0.3
and 1.0 with 5 and 10 shots (five seeds each) and on Omniglot 5-way 1-shot with the default
Conv4 (the packaged sets). No step may be non-finite, and the test NLL after the budget must
be below the stated fraction of the NLL before it (on Omniglot the accuracy also above a floor).
"""

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import Omniglot, Sinusoid
from bayesmeta.inference import METHODS, UPDATE_RULES

pytestmark = pytest.mark.slow  # about twelve minutes in all on a 2-core CPU

#: Sinusoid budget: meta-steps at meta-batch 25, and the fraction of the test NLL it must
#: reach (fresh tasks, 100 of them).
SINE_STEPS, SINE_FRACTION = 200, 0.95
#: Omniglot budget: meta-steps at meta-batch 4, and the fraction of the test NLL.
OMNI_STEPS, OMNI_FRACTION = 30, 0.9
#: ... and the test accuracy it must exceed (chance: 0.2). With the defaults every method
#: reached 0.51 (anil) to 0.73 (bayes-proto), seed 0.
OMNI_ACCURACY = 0.45


def _methods(kind: str) -> list[str]:
    return [name for name, spec in METHODS.items() if kind in spec.kinds]


def _sine_failure(method, noise, shots, seed, **options):
    """One sinusoid run of ``MetaLearner(model, method, **options)``: ``None`` if its test NLL
    fell below the fraction of its start, else what it did. ``fit`` raises NonFiniteLossError on
    a non-finite step (skip_nonfinite is off)."""
    tasks = Sinusoid(shots=shots, queries=10, noise=noise)
    torch.manual_seed(seed)
    model = bm.models.HierarchicalBNN(bm.nets.MLP(1, [40, 40], 1), bm.models.Normal(noise))
    learner = bm.MetaLearner(model, method, **options)
    before = bm.evaluate(learner, tasks, num_tasks=100, seed=100 + seed)["nll"]
    learner.fit(tasks, SINE_STEPS, meta_batch=25, seed=seed, progress=False)
    after = bm.evaluate(learner, tasks, num_tasks=100, seed=100 + seed)["nll"]
    return None if after < SINE_FRACTION * before else (round(before, 3), round(after, 3))


def _check_trains_on_omniglot(method, **options):
    train = Omniglot(split="train", queries=5)  # the packaged sets, 5-way 1-shot
    test = Omniglot(split="test", queries=5)
    torch.manual_seed(0)
    model = bm.models.HierarchicalBNN(bm.nets.Conv4(1, ways=5), bm.models.Categorical())
    learner = bm.MetaLearner(model, method, **options)
    before = bm.evaluate(learner, test, num_tasks=50, seed=7)
    learner.fit(train, OMNI_STEPS, meta_batch=4, seed=0, progress=False)
    after = bm.evaluate(learner, test, num_tasks=50, seed=7)
    assert learner.skipped_steps == 0
    assert after["nll"] < OMNI_FRACTION * before["nll"], (before, after)
    assert after["accuracy"] > OMNI_ACCURACY, (before, after)


@pytest.mark.parametrize("method", _methods("regression"))
def test_every_method_trains_on_the_sinusoid_with_its_defaults(method):
    runs = [(noise, shots, seed) for noise in (0.3, 1.0) for shots in (5, 10) for seed in range(5)]
    failures = [(*run, f) for run in runs if (f := _sine_failure(method, *run)) is not None]
    assert not failures, failures


@pytest.mark.parametrize("method", _methods("classification"))
def test_every_method_trains_on_omniglot_with_its_defaults(method):
    _check_trains_on_omniglot(method)


@pytest.mark.parametrize("update", sorted(set(UPDATE_RULES) - {"gradient", "natural"}))
def test_bayes_trains_with_every_update_rule_at_its_default_step(update):
    # The rules beyond the methods' own: a shorter sinusoid matrix, and Omniglot as above.
    runs = [(noise, 10, seed) for noise in (0.3, 1.0) for seed in range(2)]
    failures = [
        (*run, f) for run in runs if (f := _sine_failure("bayes", *run, update=update)) is not None
    ]
    assert not failures, failures
    _check_trains_on_omniglot("bayes", update=update)


def test_bayes_trains_with_the_local_reparameterisation_guide():
    # The local kernels of the MLP and of the Conv4.
    runs = [(noise, 10, seed) for noise in (0.3, 1.0) for seed in range(2)]
    failures = [
        (*run, f)
        for run in runs
        if (f := _sine_failure("bayes", *run, guide="normal-local")) is not None
    ]
    assert not failures, failures
    _check_trains_on_omniglot("bayes", guide="normal-local")
