"""Users' own guides: given as a class or an instance, named by registration, kept by save/load."""

from __future__ import annotations

import pytest
import torch

from bayesmeta.data import Sinusoid
from bayesmeta.inference import GUIDES, MetaLearner, register_guide
from bayesmeta.models import HierarchicalBNN, Normal, NormalGuide
from bayesmeta.nets import MLP


class CountingGuide(NormalGuide):
    """A Normal guide that counts how often the inner loop starts from it."""

    def __init__(self) -> None:
        self.inits = 0

    def init(self, *args, **kwargs):
        self.inits += 1
        return super().init(*args, **kwargs)


def _model() -> HierarchicalBNN:
    torch.manual_seed(0)
    return HierarchicalBNN(MLP(1, [8], 1), Normal(noise=0.3), prior_scale=0.1)


def _trained(guide) -> MetaLearner:
    learner = MetaLearner(_model(), "bayes", inner_steps=2, guide=guide)
    learner.fit(Sinusoid(shots=5, queries=5), meta_steps=3, meta_batch=4, seed=0, progress=False)
    return learner


def _mean(learner: MetaLearner) -> torch.Tensor:
    batch = Sinusoid(shots=5, queries=5).sample(3, torch.Generator().manual_seed(7))
    post = learner.adapt(
        batch.support_x, batch.support_y, generator=torch.Generator().manual_seed(1)
    )
    return post.predict(batch.query_x, generator=torch.Generator().manual_seed(2)).mean


@pytest.fixture
def registered():
    yield register_guide("counting", CountingGuide)
    GUIDES.pop("counting")


def test_an_instance_is_the_guide_the_inner_loop_uses():
    guide = CountingGuide()
    learner = _trained(guide)
    assert learner.guide is guide and guide.inits >= 3  # one per meta-step at least
    assert learner.config()["guide"] == "CountingGuide"
    assert torch.isfinite(_mean(learner)).all()


def test_a_class_is_built_once_and_used():
    learner = _trained(CountingGuide)
    assert type(learner.guide) is CountingGuide and learner.guide.inits >= 3


def test_an_unregistered_guide_must_be_passed_again_at_load(tmp_path):
    learner = _trained(CountingGuide())
    path = learner.save(tmp_path / "learner.pt")
    with pytest.raises(ValueError, match="guide 'CountingGuide'.*pass it again"):
        MetaLearner.load(path)
    loaded = MetaLearner.load(path, guide=CountingGuide)
    assert type(loaded.guide) is CountingGuide
    torch.testing.assert_close(_mean(loaded), _mean(learner))


def test_a_registered_guide_is_named_and_comes_back_from_a_file(tmp_path, registered):
    learner = _trained("counting")
    assert type(learner.guide) is CountingGuide and learner.config()["guide"] == "counting"
    path = learner.save(tmp_path / "learner.pt")
    loaded = MetaLearner.load(path)
    assert type(loaded.guide) is CountingGuide
    torch.testing.assert_close(_mean(loaded), _mean(learner))


def test_registration_refuses_a_taken_name_and_a_non_guide(registered):
    with pytest.raises(ValueError, match="'normal' is taken by NormalGuide"):
        register_guide("normal", CountingGuide)
    with pytest.raises(TypeError, match="guide_class must be a subclass of Guide"):
        register_guide("mine", dict)
    assert register_guide("counting", CountingGuide) is CountingGuide  # again: no change


@pytest.mark.parametrize("bad", [3, object(), dict])
def test_a_guide_that_is_not_a_guide_is_refused(bad):
    with pytest.raises(TypeError, match="guide must be a name of .* a Guide subclass or a Guide"):
        MetaLearner(_model(), "bayes", guide=bad)


def test_an_unknown_guide_name_is_refused():
    with pytest.raises(ValueError, match="guide must be one of"):
        MetaLearner(_model(), "bayes", guide="mine")
