"""The training loop apart from the learner (:mod:`bayesmeta.inference.training`)."""

import io

import torch
from tqdm import tqdm

from bayesmeta.data import Sinusoid
from bayesmeta.inference import MetaLearner
from bayesmeta.inference.training import _show, fit
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP


def _learner() -> MetaLearner:
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5), prior_scale=0.2)
    return MetaLearner(model, "bayes", inner_steps=1, inner_lr=0.01, particles=2)


def test_the_method_fit_is_the_function_fit():
    by_method, by_function = _learner(), _learner()
    kwargs = dict(meta_batch=3, seed=4, progress=False, lr_schedule="cosine")
    history = by_method.fit(Sinusoid(4, 4), 3, **kwargs)
    assert fit(by_function, Sinusoid(4, 4), 3, **kwargs) is by_function.history
    assert [r["loss"] for r in history] == [r["loss"] for r in by_function.history]
    for a, b in zip(by_method.model.theta(), by_function.model.theta(), strict=True):
        assert torch.equal(a, b)


def test_the_progress_bar_shows_validation_accuracy_as_a_percentage():
    out = io.StringIO()
    bar = tqdm(total=2, file=out)
    _show(bar, {"loss": 1.234567, "val_accuracy": 0.8934, "step": 1.0})
    bar.close()
    assert "loss=1.235, val_accuracy=89.3%]" in out.getvalue()
    assert "step" not in out.getvalue().split("it/s")[-1]
