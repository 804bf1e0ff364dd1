"""The examples run and do what they say, at a tiny budget."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.slow, pytest.mark.integration]  # whole example programs, meta-trained


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["maml", "bayes"])
def test_meta_rl_point_navigation_returns_improve_after_adaptation(method):
    nav = _load("point_navigation")
    learner = nav.make_learner(method)
    history = nav.meta_train(learner, iterations=60, tasks=8, episodes=8, horizon=20)
    early_before = sum(b for b, _ in history[:10]) / 10
    before = sum(b for b, _ in history[-20:]) / 20
    after = sum(a for _, a in history[-20:]) / 20
    assert after > before, (method, before, after)  # one policy-gradient step helps
    assert after > early_before, (method, early_before, after)  # and meta-training did too
