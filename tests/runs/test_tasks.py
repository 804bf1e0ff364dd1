"""Task families as registered specs: a new one runs through the settings with no other code."""

from __future__ import annotations

import pytest
import torch

from bayesmeta.data import TaskBatch
from bayesmeta.models import Normal
from bayesmeta.nets import MLP
from bayesmeta.runs import (
    DEFAULTS,
    RUN_TASKS,
    TASK_PRESETS,
    RunTask,
    UsageError,
    default_config,
    make_learner,
    make_tasks,
    option_tasks,
    register_run_task,
)


class _Lines:
    """Tasks y = a·x + noise, one slope per task."""

    def __init__(self, shots: int, queries: int):
        self.shots, self.queries = shots, queries

    def sample(self, num_tasks, generator=None):
        a = torch.randn(num_tasks, 1, 1, generator=generator)
        x = torch.randn(num_tasks, self.shots + self.queries, 1, generator=generator)
        y = a * x + 0.1 * torch.randn(x.shape, generator=generator)
        s = self.shots
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])


class _LinesRun(RunTask):
    name = "lines"
    kind = "regression"
    defaults = {"shots": 4, "queries": 6, "hidden": "8", "noise": 0.1, "meta_batch": 3}
    defaults["inner_lr"] = {"gradient": 0.05}
    defaults["prior_scale"] = 0.5
    preset = {"method": "maml", "meta_steps": 2}

    def tasks(self, config, split):
        return _Lines(config["shots"], config["queries"])

    def model(self, config):
        return MLP(1, [int(config["hidden"])], 1), Normal(config["noise"])

    def backbone(self, hidden):
        return f"MLP {hidden}"


@pytest.fixture
def lines():
    register_run_task(_LinesRun)
    yield RUN_TASKS["lines"]
    del RUN_TASKS["lines"]


def test_a_registered_task_is_configured_built_and_trained(lines):
    assert DEFAULTS["lines"]["shots"] == 4 and TASK_PRESETS["lines"]["method"] == "maml"
    config = default_config({"task": "lines"})
    assert config["method"] == "maml" and config["inner_lr"] == 0.05
    assert config["ways"] is None  # another task's setting, present and unset
    tasks = make_tasks(config, "train")
    learner = make_learner(config)
    history = learner.fit(tasks, meta_steps=2, meta_batch=3, seed=0, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_unknown_tasks_and_taken_names_are_refused(lines):
    with pytest.raises(UsageError, match="unknown task 'lnes'; expected one of .*'lines'"):
        default_config({"task": "lnes"})

    class Other(_LinesRun):
        pass

    with pytest.raises(ValueError, match="the run task name 'lines' is taken by _LinesRun"):
        register_run_task(Other)
    with pytest.raises(TypeError, match="a RunTask subclass with a name"):
        register_run_task(object)


def test_a_task_that_is_not_a_name_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"unknown task \['sinusoid'\]"):
        default_config({"task": ["sinusoid"]})


def test_a_settings_tasks_come_from_the_specs(lines):
    assert option_tasks("noise") == ("sinusoid", "lines")  # in both families' defaults
    assert option_tasks("ways") == ("omniglot",)
    assert option_tasks("data_root") == ("omniglot",)  # read by the families that need data
    assert option_tasks("meta_steps") == tuple(RUN_TASKS)  # a general setting
    assert option_tasks("shots") == tuple(RUN_TASKS)
