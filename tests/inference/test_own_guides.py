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


def test_particle_guides_keep_their_particles_and_refuse_what_cannot_be_saved(tmp_path):
    from bayesmeta.models import ParticleGuide

    learner = MetaLearner(_model(), "bmaml", guide=ParticleGuide, particles=7)
    assert learner.guide.num_particles == 7 == learner.eval_particles
    with pytest.raises(ValueError, match="particles=4 disagrees with the guide's 3"):
        MetaLearner(_model(), "bmaml", guide=ParticleGuide(3), particles=4)
    fixed = MetaLearner(_model(), "bmaml", guide=ParticleGuide(3, bandwidth=0.5))
    path = fixed.save(tmp_path / "fixed.pt")
    with pytest.raises(ValueError, match=r"ParticleGuide\(bandwidth=0.5\).*pass it again"):
        MetaLearner.load(path)
    loaded = MetaLearner.load(path, guide=ParticleGuide(3, bandwidth=0.5))
    assert loaded.guide.bandwidth == 0.5 and loaded.guide.num_particles == 3


def test_a_registered_particle_guide_comes_back_with_its_particles(tmp_path):
    from bayesmeta.models import ParticleGuide

    class Stein(ParticleGuide):
        pass

    register_guide("stein", Stein)
    try:
        learner = MetaLearner(_model(), "bmaml", guide="stein", particles=3)
        loaded = MetaLearner.load(learner.save(tmp_path / "s.pt"))
        assert type(loaded.guide) is Stein and loaded.guide.num_particles == 3
        assert loaded.eval_particles == 3
    finally:
        GUIDES.pop("stein")


def test_reptile_takes_a_point_guide_of_the_users():
    from bayesmeta.models import DeltaGuide

    class MyDelta(DeltaGuide):
        pass

    model = HierarchicalBNN(MLP(1, [8], 1), Normal(noise=0.3), prior_scale=None)
    assert isinstance(MetaLearner(model, "reptile", guide=MyDelta).guide, MyDelta)
    with pytest.raises(ValueError, match="reptile moves point estimates"):
        MetaLearner(_model(), "reptile", guide=CountingGuide)


def test_the_learner_follows_what_a_guide_declares_not_its_class():
    from bayesmeta.models import DeltaGuide, Guide

    class Point(Guide):  # a point estimate written from the base class, not a DeltaGuide
        point_estimate = True
        max_particles = 1
        init, point_names = DeltaGuide.init, DeltaGuide.point_names
        sample, elbo_grads, kl = DeltaGuide.sample, DeltaGuide.elbo_grads, DeltaGuide.kl

    flat = HierarchicalBNN(MLP(1, [8], 1), Normal(noise=0.3), prior_scale=None)
    learner = MetaLearner(flat, "reptile", guide=Point)
    learner.fit(Sinusoid(shots=5, queries=5), meta_steps=2, meta_batch=3, seed=0, progress=False)
    with pytest.raises(ValueError, match="'bayes-head': .*this guide is a point estimate"):
        MetaLearner(_model(), "bayes-head", guide=Point)

    class Wide(Point):  # the same guide, declared to start at the prior
        needs_prior = True

    with pytest.raises(ValueError, match="starts at the prior"):
        MetaLearner(flat, "reptile", guide=Wide)

    class Drawn(NormalGuide):  # draws a fixed number of times, as particles do
        own_particles = 3

    assert MetaLearner(_model(), "bayes", guide=Drawn).eval_particles == 3
    with pytest.raises(ValueError, match="particles=2 disagrees with the guide's 3"):
        MetaLearner(_model(), "bayes", guide=Drawn, particles=2)
