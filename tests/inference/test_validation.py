"""Bad input to the API: one clear error naming the argument, up front; never a silent NaN."""

import json
import math
import re

import pytest
import torch

from bayesmeta.data import Sinusoid
from bayesmeta.inference import MetaLearner, load_checkpoint, posterior, save_checkpoint
from bayesmeta.models import Categorical, HierarchicalBNN, Normal
from bayesmeta.nets import MLP, Conv4


def _learner(method="bayes", hidden=(8,), **kwargs):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, list(hidden), 1), Normal(0.5), prior_scale=0.2)
    return MetaLearner(model, method, inner_steps=1, inner_lr=0.01, **kwargs)


@pytest.fixture(scope="module")
def batch():
    return Sinusoid(5, 5).sample(3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["support_x", "support_y"])
def test_adapt_refuses_non_finite_support_data(batch, where, bad):
    x, y = batch.support_x.clone(), batch.support_y.clone()
    (x if where == "support_x" else y)[1, 2, 0] = bad
    with pytest.raises(ValueError, match=f"{where} must be finite, found 1 NaN or inf"):
        _learner().adapt(x, y)


@pytest.mark.parametrize(
    "shape, message",
    [((0, 5, 1), r"one task \(T >= 1\), got shape \(0, 5, 1\)"), ((3, 0, 1), r"one point")],
)
def test_adapt_refuses_zero_tasks_and_empty_support_sets(shape, message):
    with pytest.raises(ValueError, match=f"support_x must hold at least {message}"):
        _learner().adapt(torch.zeros(shape), torch.zeros(shape))


def test_adapt_converts_float64_inputs_to_the_models_dtype_deliberately(batch):
    learner = _learner()
    g = dict(generator=torch.Generator().manual_seed(1))
    a = learner.adapt(batch.support_x, batch.support_y, **g).predict(batch.query_x, **g)
    g = dict(generator=torch.Generator().manual_seed(1))
    b = learner.adapt(batch.support_x.double(), batch.support_y.double(), **g)
    b = b.predict(batch.query_x.double(), **g)
    assert b.mean.dtype == torch.float32
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"support_x must be floating point.*torch.uint8"):
        learner.adapt(batch.support_x.to(torch.uint8), batch.support_y)


@pytest.mark.parametrize(
    "targets, message",
    [
        # T == S: [T, S] agrees with x on T and S, and would broadcast against [P, T, S, 1].
        (lambda y: y[..., 0], r"support_y: targets must have shape \[T, B, 1\].*got \(5, 5\)"),
        (lambda y: y.long(), r"support_y: the Normal likelihood expects real targets.*int64"),
    ],
)
@pytest.mark.parametrize("how", ["adapt", "adapt_differentiable"])
def test_both_adaptations_refuse_targets_the_likelihood_cannot_score(how, targets, message):
    batch = Sinusoid(5, 5).sample(5, generator=torch.Generator().manual_seed(0))  # T == S == 5
    with pytest.raises(ValueError, match=message):
        getattr(_learner(), how)(batch.support_x, targets(batch.support_y))


@pytest.mark.parametrize("steps", [-1, 2.5, "3", True])
def test_adapt_refuses_steps_that_are_not_non_negative_ints(batch, steps):
    with pytest.raises(ValueError, match=f"steps must be an int >= 0, got {steps!r}"):
        _learner().adapt(batch.support_x, batch.support_y, steps=steps)


@pytest.mark.parametrize("particles", [0, -2, 2.5])
def test_predict_refuses_particles_that_are_not_positive_ints(batch, particles):
    post = _learner().adapt(batch.support_x, batch.support_y)
    with pytest.raises(ValueError, match=f"particles must be a positive int, got {particles}"):
        post.predict(batch.query_x, particles=particles)
    with pytest.raises(ValueError, match="particles must be a positive int"):
        post.sample_weights(particles)
    assert post.predict(batch.query_x, particles=3).outputs.shape[0] == 3


def test_predict_refuses_particles_that_would_not_fit_before_drawing(batch, monkeypatch):
    post = _learner().adapt(batch.support_x, batch.support_y)
    sample = post.guide.sample

    def draw_nothing(*args, **kwargs):  # (without the check: a 34 GiB allocation)
        raise AssertionError("drew before checking the size")

    monkeypatch.setattr(post.guide, "sample", draw_nothing)
    message = (
        r"particles=100000000 would take about 33.5 GiB .* P·T·Q·O = 100000000·3·5·1 and "
        r"weight draws P·T·Σ\|w\| = 100000000·3·25 values of 4 bytes\), over the limit of 4 GiB"
    )
    with pytest.raises(ValueError, match=message):
        post.predict(batch.query_x, particles=10**8)
    monkeypatch.setattr(post.guide, "sample", sample)
    # The largest number it names fits, one more does not.
    monkeypatch.setattr(posterior, "MEMORY_LIMIT", 2**20)
    with pytest.raises(ValueError, match=r"ask for at most \d+ particles") as err:
        post.predict(batch.query_x, particles=10**4)
    most = int(re.search(r"at most (\d+) particles", str(err.value)).group(1))
    assert post.predict(batch.query_x, particles=most).outputs.shape[0] == most
    with pytest.raises(ValueError, match=f"particles={most + 1} would take"):
        post.predict(batch.query_x, particles=most + 1)
    # A point estimate draws one value, however many are asked for.
    point = _learner("maml").adapt(batch.support_x, batch.support_y)
    assert point.predict(batch.query_x, particles=10**7).outputs.shape[0] == 1


def test_particles_whose_svgd_kernel_would_not_fit_are_refused_at_construction():
    model = HierarchicalBNN(MLP(1, [40, 40], 1), Normal(0.5), prior_scale=0.2)
    message = (
        r"particles=100000 would take about 2.99e\+04 GiB for the ParticleGuide's draws in one "
        r"inner step on one task \(1761 weights per task, 1 × 100000 × 1761 draws at least\), "
        r"over the limit of 4 GiB \(bayesmeta.inference.posterior.MEMORY_LIMIT\); use at most "
        r"1155 particles$"
    )
    with pytest.raises(ValueError, match=message):  # (SVGD's M² kernel: an 80 GB allocation)
        MetaLearner(model, "bmaml", particles=100_000)
    assert MetaLearner(model, "bmaml", particles=1155).inner.particles == 1155
    with pytest.raises(ValueError, match="particles=1156 would take about 4 GiB"):
        MetaLearner(model, "bmaml", particles=1156)


def test_a_meta_step_or_adaptation_that_would_not_fit_is_refused_before_drawing(monkeypatch):
    model = HierarchicalBNN(MLP(1, [40, 40], 1), Normal(0.5), prior_scale=0.2)
    learner = MetaLearner(model, "bayes", particles=100_000, inner_lr=0.01)

    def draw_nothing(*args, **kwargs):
        raise AssertionError("drew before checking the size")

    monkeypatch.setattr(learner.guide, "sample", draw_nothing)
    tasks = Sinusoid(10, 10).sample(25, generator=torch.Generator().manual_seed(0))
    message = (
        r"particles=100000 would take about 6.99 GiB for the AntitheticNormalGuide's draws in "
        r"one inner step on one task \(.*\) and one task's activations \(100000 × 70 "
        r"inputs\), over the limit of 4 GiB .*; use at most 57202 particles$"
    )
    with pytest.raises(ValueError, match=message):
        learner.meta_step(tasks)
    assert learner.step == 0
    monkeypatch.setattr(posterior, "MEMORY_LIMIT", 2**30)  # (one limit: predict's too)
    message = r"on 25 tasks at once .* over the limit of 1 GiB .* at most 6097 particles, or fewer"
    with pytest.raises(ValueError, match=message):
        learner.adapt(tasks.support_x, tasks.support_y)


def test_predict_refuses_non_finite_queries(batch):
    post = _learner().adapt(batch.support_x, batch.support_y)
    qx = batch.query_x.clone()
    qx[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="query_x must be finite"):
        post.predict(qx)


def test_log_prob_refuses_a_wrong_shape_of_targets(batch):
    pred = _learner().adapt(batch.support_x, batch.support_y).predict(batch.query_x)
    assert pred.log_prob(batch.query_y).shape == (3, 5)
    # [T, Q] would broadcast against [P, T, Q, 1] into a score of the wrong points.
    with pytest.raises(ValueError, match=r"y must hold real targets of shape \[T, Q, D\]"):
        pred.log_prob(batch.query_y[..., 0])
    with pytest.raises(ValueError, match=r"\[3, 5, 1\], got torch.float32 of shape \(1, 5, 1\)"):
        pred.log_prob(batch.query_y[:1])


class _ScalarNormal(Normal):  # a user's likelihood that sums what it should not
    def log_prob(self, f, y):
        return super().log_prob(f, y).sum()


class _PerTaskNormal(Normal):
    def log_prob(self, f, y):
        return super().log_prob(f, y).sum(-1)


class _EventAxisNormal(Normal):
    def log_prob(self, f, y):
        return torch.distributions.Normal(f, self.noise).log_prob(y)


class _PerTaskCategorical(Categorical):
    def log_prob(self, f, y):
        return super().log_prob(f, y).sum(-1)


@pytest.mark.parametrize("method", ["maml", "bayes"])
@pytest.mark.parametrize(
    "likelihood, found",
    [
        (_ScalarNormal, r"\(\)"),
        (_PerTaskNormal, r"\(P, 3\)"),
        (_EventAxisNormal, r"\(P, 3, 5, 1\)"),
    ],
)
def test_a_log_prob_of_the_wrong_shape_is_refused_at_the_first_meta_step(
    batch, method, likelihood, found
):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 1), likelihood(0.5), prior_scale=0.2)
    learner = MetaLearner(model, method, inner_steps=1, inner_lr=0.01)
    P = learner.inner.particles
    message = (
        rf"{likelihood.__name__}.log_prob\(f, y\) must return one log density per point, shape "
        rf"\[\*lead, T, B\] = \({P}, 3, 5\) for outputs f of shape \({P}, 3, 5, 1\), got "
        + found.replace("P", str(P))
    )
    with pytest.raises(ValueError, match=message):
        learner.meta_step(batch)


@pytest.mark.parametrize("likelihood", [_ScalarNormal, _PerTaskNormal, _EventAxisNormal])
def test_a_log_prob_of_the_wrong_shape_is_refused_by_adapt_alone(batch, likelihood):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 1), likelihood(0.5), prior_scale=0.2)
    learner = MetaLearner(model, "maml", inner_steps=1)
    with pytest.raises(ValueError, match=rf"{likelihood.__name__}.log_prob\(f, y\) must return"):
        learner.adapt(batch.support_x, batch.support_y)


def test_a_log_prob_of_the_wrong_shape_is_refused_when_scoring():
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 3), _PerTaskCategorical(), prior_scale=0.2)
    learner = MetaLearner(model, "bayes", inner_steps=0, inner_lr=0.01, eval_particles=2)
    x, y = torch.randn(2, 4, 1), torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0]])
    pred = learner.adapt(x, y).predict(x)
    message = r"_PerTaskCategorical.log_prob.*\[\*lead, T, B\] = \(2, 2, 4\).*got \(2, 2\)"
    with pytest.raises(ValueError, match=message):
        pred.log_prob(y)


def test_log_prob_refuses_out_of_range_labels():
    torch.manual_seed(0)
    net = Conv4(1, 3, hidden=4, image_size=16)
    learner = MetaLearner(HierarchicalBNN(net, Categorical(), prior_scale=0.1), "maml", 1)
    x, y = torch.randn(2, 3, 1, 16, 16), torch.tensor([[0, 1, 2], [2, 1, 0]])
    pred = learner.adapt(x, y).predict(x)
    assert pred.log_prob(y).shape == (2, 3)
    with pytest.raises(ValueError, match=r"y labels must lie in \[0, 3\), found range \[1, 3\]"):
        pred.log_prob(y + 1)
    with pytest.raises(ValueError, match=r"integer class labels of shape \[T, Q\] = \[2, 3\]"):
        pred.log_prob(y[0])


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0, "1"])
def test_hyperprior_weight_must_be_a_finite_non_negative_float(weight):
    with pytest.raises(ValueError, match=f"hyperprior_weight must be a .*got {weight!r}"):
        _learner(hyperprior_weight=weight)


def test_a_device_this_machine_lacks_is_refused_up_front(monkeypatch):
    with pytest.raises(ValueError, match="device 'tpu9' is not a torch device"):
        _learner(device="tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:7' is not available .* has no CUDA GPU"):
        _learner(device="cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = r"device 'cuda:7' is not available on this machine: it has 2 CUDA GPUs \(cuda:0 to"
    with pytest.raises(ValueError, match=message):
        _learner(device="cuda:7")
    assert _learner(device="cpu").device == torch.device("cpu")


def test_seed_must_be_an_int_before_any_work(tmp_path):
    calls = []

    class Tasks(Sinusoid):
        def sample(self, *args, **kwargs):
            calls.append(args)
            return super().sample(*args, **kwargs)

    with pytest.raises(TypeError, match="seed must be an int, got 'a'"):
        _learner().fit(Tasks(5, 5), meta_steps=1, meta_batch=2, seed="a", progress=False)
    assert calls == []


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_an_unusable_checkpoint_dir_fails_before_the_first_meta_step(tmp_path, kind):
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" if kind == "file" else tmp_path / "file" / "run"
    learner = _learner()
    steps = []
    with pytest.raises(ValueError, match="checkpoint_dir must be a"):
        learner.fit(
            Sinusoid(5, 5),
            meta_steps=3,
            meta_batch=2,
            checkpoint_dir=target,
            checkpoint_every=2,
            progress=False,
            callback=lambda learner, record: steps.append(record),
        )
    assert steps == [] and learner.step == 0
    assert (tmp_path / "file").read_text() == "not a folder"


def _fit(learner, folder, **kwargs):
    kwargs = {"meta_steps": 2, "meta_batch": 2, "checkpoint_dir": folder, **kwargs}
    return learner.fit(Sinusoid(5, 5), progress=False, **kwargs)


@pytest.mark.parametrize("other", ["maml", "anil", "map", "metasgd"])
def test_resume_into_another_method_names_every_difference(tmp_path, other):
    _fit(_learner("bayes"), tmp_path)
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    learner = _learner(other)
    with pytest.raises(ValueError, match="checkpoint_dir holds a run of other settings") as err:
        _fit(learner, tmp_path, meta_steps=4)
    message = str(err.value)
    assert f"method: 'bayes' in the checkpoint, '{other}' here" in message
    assert "guide: 'normal-antithetic' in the checkpoint, 'delta' here" in message
    assert learner.step == 0  # nothing was restored
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == before["step"] == 2


def test_resume_names_model_and_settings_differences(tmp_path):
    _fit(_learner("maml"), tmp_path)
    with pytest.raises(ValueError) as err:
        _fit(_learner("maml", hidden=(9,), kl_weight=0.5), tmp_path, meta_steps=4, meta_batch=3)
    message = str(err.value)
    for part in (
        "model.net.hidden: [8] in the checkpoint, [9] here",
        "kl_weight: 1.0 in the checkpoint, 0.5 here",
        "meta_batch: 2 in the checkpoint, 3 here",
    ):
        assert part in message, message


def test_resume_of_the_same_run_continues(tmp_path):
    first = _learner("maml", task_chunk=1)
    _fit(first, tmp_path)
    again = _learner("maml", task_chunk=None)  # how tasks are chunked may change
    _fit(again, tmp_path, meta_steps=3)
    assert again.step == 3 and len(again.history) == 3


def test_a_flipped_bit_in_tensor_data_is_caught(tmp_path):
    learner = _learner()
    path = learner.save(tmp_path / "learner.pt")
    payload = load_checkpoint(path)
    raw = bytearray(path.read_bytes())
    # torch.save stores a tensor's bytes raw: find one weight's bytes, flip one bit there.
    tensor = next(t for t in payload["model"].values() if t.numel() >= 8)
    at = bytes(raw).find(tensor.contiguous().numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is damaged: its content .* does not match the SHA-256"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="is damaged"):
        MetaLearner.load(path)


def test_an_edited_config_string_is_caught(tmp_path):
    path = _learner().save(tmp_path / "learner.pt")
    payload = torch.load(path, weights_only=True)  # the loader's own path; checksum kept
    assert '"inner_lr": 0.01' in payload["config"]
    payload["config"] = payload["config"].replace('"inner_lr": 0.01', '"inner_lr": 0.09')
    torch.save(payload, path)
    message = f"{re.escape(str(path))} is damaged: its content .* does not match the SHA-256"
    with pytest.raises(ValueError, match=message):
        MetaLearner.load(path)
    payload = torch.load(path, weights_only=True)
    payload["config"] = payload["config"].replace('"inner_lr": 0.09', '"inner_lr": 0.01')
    payload["history"] = '[{"loss": 0.0}]'  # any other entry counts as well
    torch.save(payload, path)
    with pytest.raises(ValueError, match="is damaged"):
        load_checkpoint(path)


def test_checksum_survives_a_round_trip_and_a_file_without_one_is_refused(tmp_path):
    learner = _learner("metasgd")
    path = learner.save(tmp_path / "learner.pt")
    payload = torch.load(path, weights_only=True)
    assert len(payload["payload_sha256"]) == 64
    del payload["payload_sha256"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="is not a bayesmeta checkpoint: it carries no checksum"):
        MetaLearner.load(path)
    # A payload saved again gets a fresh checksum of its own content.
    save_checkpoint(path, payload)
    assert MetaLearner.load(path).config() == learner.config()
    save_checkpoint(path, load_checkpoint(path))
    assert MetaLearner.load(path).config() == learner.config()


def test_a_saved_model_description_with_an_unknown_keyword_is_refused(tmp_path):
    path = _learner().save(tmp_path / "learner.pt")
    payload = load_checkpoint(path)
    config = json.loads(payload["config"])
    config["model"]["net"]["dropout"] = 0.5
    payload["config"] = json.dumps(config)
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match=r"MLP backbone has unknown keys \['dropout'\]"):
        MetaLearner.load(path)
    del config["model"]["net"]["dropout"]
    config["warp_speed"] = 9
    payload["config"] = json.dumps(config)
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match=r"learner has unknown keys \['warp_speed'\]"):
        MetaLearner.load(path)
