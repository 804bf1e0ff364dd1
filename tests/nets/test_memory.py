"""The memory ceiling of the default settings: the task chunk a meta-step backpropagates at once
is chosen so that its estimated activations fit the budget."""

import platform
import subprocess
import sys

import pytest
import torch

import bayesmeta as bm
from bayesmeta.data import TaskBatch
from bayesmeta.nets import MLP, Conv4, preferred_task_chunk
from bayesmeta.nets.memory import (
    TASK_MEMORY_BUDGET_MB,
    activation_bytes,
    freed_memory_kept,
    task_chunk_for_memory,
)


def _omniglot_batch(T: int, ways: int, side: int = 28, queries: int = 15) -> TaskBatch:
    labels = torch.arange(ways)
    return TaskBatch(
        torch.zeros(T, ways, 1, side, side),
        labels.repeat(T, 1),
        torch.zeros(T, ways * queries, 1, side, side),
        labels.repeat_interleave(queries).repeat(T, 1),
    )


def _default_learner(ways: int, **kwargs) -> bm.MetaLearner:
    """``bayesmeta train --task omniglot --ways WAYS``'s learner (bayes: P = 4, K = 5)."""
    net = Conv4(1, ways, hidden=32, image_size=28, zero_head=True)
    model = bm.models.HierarchicalBNN(net, bm.models.Categorical(), prior_scale=0.1)
    return bm.MetaLearner(model, "bayes", inner_steps=5, inner_lr=0.5, **kwargs)


def test_conv4_activations_follow_the_feature_maps():
    net = Conv4(1, 5, hidden=32, image_size=28)
    # Four blocks of 32 channels at 28, 14, 7 and 3 pixels a side, float32.
    one = activation_bytes(net, 1)
    assert one == int(4.5 * 4 * 32 * (28**2 + 14**2 + 7**2 + 3**2))
    assert activation_bytes(net, 10) == pytest.approx(10 * one, abs=10)
    assert activation_bytes(net.double(), 1) == pytest.approx(2 * one, abs=2)
    assert activation_bytes(torch.nn.Linear(2, 2), 1) is None  # a user's own: unknown


def _cpu_chunk(otherwise: int) -> int:
    """A Conv4's "auto" chunk on a CPU: one task once the allocator keeps freed memory (which
    a script opts in to, as the command line does), else ``otherwise``."""
    return 1 if freed_memory_kept() else otherwise


def test_the_default_20_way_meta_step_fits_the_budget():
    learner = _default_learner(20)
    batch = _omniglot_batch(32, 20)
    assert learner.task_chunk == _cpu_chunk(8)
    points = 4 * (20 * 15 + 6 * 20)
    fits = task_chunk_for_memory(learner.model.net, "cpu", points)
    assert fits == 2
    assert fits * activation_bytes(learner.model.net, points) <= TASK_MEMORY_BUDGET_MB * 2**20
    assert (fits + 1) * activation_bytes(learner.model.net, points) > TASK_MEMORY_BUDGET_MB * 2**20
    assert learner.chunk_size(batch) == _cpu_chunk(2)


def test_small_tasks_keep_the_kernels_chunk_and_explicit_chunks_are_kept():
    assert _default_learner(5).chunk_size(_omniglot_batch(32, 5)) == _cpu_chunk(8)
    assert _default_learner(20, task_chunk=16).chunk_size(_omniglot_batch(32, 20)) == 16
    assert _default_learner(20, task_chunk=None).chunk_size(_omniglot_batch(32, 20)) == 32
    assert _default_learner(20).chunk_size(_omniglot_batch(1, 20)) == 1


_CONSTRUCT = """
import bayesmeta as bm
from bayesmeta.nets.memory import freed_memory_kept
from bayesmeta.runs.settings import default_config, make_learner
model = bm.models.HierarchicalBNN(bm.nets.Conv4(1, 5, hidden=8), bm.models.Categorical())
bm.MetaLearner(model, "maml", task_chunk="auto")
print(freed_memory_kept())
make_learner(default_config({"task": "omniglot", "method": "maml", "hidden": "8"}))
print(freed_memory_kept())
"""


def test_a_learner_leaves_the_allocator_alone_and_a_run_opts_in():
    """A library constructor changes no process-wide state; the runs that the command line
    and the suites build ask glibc to keep freed memory (where it can: glibc on Linux)."""
    run = subprocess.run(
        [sys.executable, "-c", _CONSTRUCT], capture_output=True, text=True, check=True
    )
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert run.stdout.split() == ["False", str(glibc)]


_FREE_24_MIB = """
import sys, torch
from bayesmeta.nets import keep_freed_memory
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(6 << 20)  # 24 MiB, touched
before = rss()
del x
print(before - rss())
"""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="keep_freed_memory asks glibc's allocator",
)
def test_kept_memory_stays_resident_after_a_free_and_is_returned_otherwise():
    def returned_mib(mode: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", _FREE_24_MIB, mode], capture_output=True, text=True, check=True
        )
        return float(run.stdout.split()[-1])

    assert returned_mib("default") > 20  # glibc unmapped the block at once
    assert returned_mib("keep") < 4  # kept for the next allocation


def test_chunk_for_memory_never_drops_below_one_task_and_grows_with_the_budget():
    net = Conv4(1, 20, hidden=64, image_size=84)
    assert task_chunk_for_memory(net, "cpu", 10_000) == 1
    assert task_chunk_for_memory(net, "cpu", 100, budget_mb=10_000) > 1
    mlp = MLP(1, [40, 40], 1)
    assert preferred_task_chunk(mlp, "cpu") is None
    assert preferred_task_chunk(mlp, "cpu", points_per_task=60) > 10_000  # effectively all


def test_auto_is_saved_as_auto(tmp_path):
    learner = _default_learner(20)
    assert learner.config()["task_chunk"] == "auto"  # re-decided where it is loaded
    loaded = bm.MetaLearner.load(learner.save(tmp_path / "l.pt"))
    assert loaded.chunk_size(_omniglot_batch(32, 20)) == _cpu_chunk(2)
    assert _default_learner(5, task_chunk=4).config()["task_chunk"] == 4
