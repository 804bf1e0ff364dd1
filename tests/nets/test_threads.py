"""Intra-op threads: one for small work, torch's setting otherwise, always restored."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayesmeta.data import Sinusoid
from bayesmeta.inference import MetaLearner
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP, Conv4, intra_op_threads, threads, threads_for


def test_small_work_gets_one_thread_and_large_or_unknown_work_torchs_setting(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)  # an idle machine
    mlp, conv = MLP(1, [40, 40], 1), Conv4(1, 5, hidden=32)
    assert threads_for(mlp, 4 * 25 * 70) == 1  # bayes on 25 sinusoid tasks
    assert threads_for(conv, 8 * 105) is None  # a chunk of 8 Omniglot 5-way tasks
    assert threads_for(torch.nn.Linear(1, 1), 10) is None  # activations unknown
    assert threads_for(conv, 10, setting=3) == 3
    assert threads_for(mlp, 10, setting=None) is None


def test_large_work_leaves_the_cores_that_others_keep_busy(monkeypatch):
    conv = Conv4(1, 5, hidden=32)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    for busy, expected in ((1, 3), (3, 1), (6, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda busy=busy: busy)
        assert threads_for(conv, 8 * 105) == expected
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # never more than torch's
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    assert threads_for(conv, 8 * 105) == 2


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads Linux's /proc")
def test_busy_cores_counts_another_process_that_spins():
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nt=time.time()+20\nwhile time.time()<t: pass"]
    )
    try:
        time.sleep(0.5)
        assert threads.busy_cores() >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_busy_cores_is_zero_where_proc_cannot_be_read(monkeypatch):
    def unreadable(*args, **kwargs):
        raise PermissionError("no /proc here")

    monkeypatch.setattr("builtins.open", unreadable)
    assert threads.busy_cores() == 0


def test_the_thread_setting_is_restored_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("setting, expected", [("auto", 1), (None, "torch"), (2, 2)])
def test_meta_steps_run_on_the_chosen_threads(setting, expected):
    seen = []

    def loss(outputs, y):  # records the threads the inner loop runs on
        seen.append(torch.get_num_threads())
        return (outputs - y).square().sum((-2, -1))

    before = torch.get_num_threads()
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.3), prior_scale=None)
    learner = MetaLearner(model, "maml", inner_steps=2, inner_loss=loss, threads=setting)
    learner.meta_step(Sinusoid(5, 5).sample(4, torch.Generator().manual_seed(0)))
    assert seen and set(seen) == {before if expected == "torch" else expected}
    assert torch.get_num_threads() == before


def test_a_bad_thread_setting_is_refused_by_name():
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.3), prior_scale=None)
    with pytest.raises(ValueError, match="threads must be a positive int, 'auto' or None, got 0"):
        MetaLearner(model, "maml", threads=0)
