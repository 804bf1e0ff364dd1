"""Checkpoints: atomic, never unpickled, and a SIGKILLed run resumes bit for bit."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bayesmeta.data import Sinusoid
from bayesmeta.inference import MetaLearner, load_checkpoint, save_checkpoint
from bayesmeta.models import HierarchicalBNN, Normal
from bayesmeta.nets import MLP

STEPS = 24

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from bayesmeta.data import Sinusoid
    from bayesmeta.inference import MetaLearner
    from bayesmeta.models import HierarchicalBNN, Normal
    from bayesmeta.nets import MLP
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [16], 1), Normal(0.5), prior_scale=0.2)
    learner = MetaLearner(model, "bayes", inner_steps=2, inner_lr=0.01, particles=2)
    slow = lambda learner, record: time.sleep(float(sys.argv[2]))
    learner.fit(Sinusoid(5, 5), meta_steps={steps}, meta_batch=4, checkpoint_dir=sys.argv[1],
                checkpoint_every=1, seed=3, progress=False, callback=slow,
                lr_schedule="cosine")
    learner.save(sys.argv[1] + "/final.pt")
    """
).format(steps=STEPS)


def _run(tmp_path, name, sleep, kill_after_step=None):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(sleep)])
    if kill_after_step is not None:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = out / "checkpoint.pt"
            if ckpt.is_file() and load_checkpoint(ckpt)["step"] >= kill_after_step:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = load_checkpoint(out / "checkpoint.pt")["step"]
        assert kill_after_step <= step < STEPS, "the kill should land mid-run"
        proc = subprocess.Popen([sys.executable, str(script), str(out), "0"])
    assert proc.wait(timeout=300) == 0
    return load_checkpoint(out / "final.pt")


@pytest.mark.slow
@pytest.mark.integration
def test_sigkilled_run_resumes_bitwise_equal(tmp_path):
    # With a cosine schedule: the resumed run must also pick up the step size where it was.
    whole = _run(tmp_path, "whole", 0.0)
    resumed = _run(tmp_path, "resumed", 0.15, kill_after_step=5)
    assert whole["step"] == resumed["step"] == STEPS
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(
        whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True
    ):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_save_load_round_trip_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5, learn_noise=True), prior_scale=0.2)
    learner = MetaLearner(model, "metasgd", inner_steps=2, inner_lr=0.01)
    learner.fit(Sinusoid(5, 5), meta_steps=3, meta_batch=4, progress=False)
    path = learner.save(tmp_path / "learner.pt")
    loaded = MetaLearner.load(path)
    assert loaded.config() == learner.config() and loaded.step == 3
    batch = Sinusoid(5, 5).sample(3, generator=torch.Generator().manual_seed(1))
    a = learner.adapt(batch.support_x, batch.support_y).predict(batch.query_x)
    b = loaded.adapt(batch.support_x, batch.support_y).predict(batch.query_x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.stddev, b.stddev)


def test_metasgd_file_with_linear_step_sizes_is_refused_not_misread(tmp_path):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5), prior_scale=0.2)
    path = MetaLearner(model, "metasgd", inner_steps=1, inner_lr=0.01).save(tmp_path / "a.pt")
    payload = load_checkpoint(path)
    config = json.loads(payload["config"])
    assert config.pop("step_size_space") == "log"
    payload["config"] = json.dumps(config)  # as written before step sizes moved to log space
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match="old linear form.*retrain"):
        MetaLearner.load(path)


def test_checkpoint_is_written_atomically_and_never_unpickled(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"x": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "bayesmeta-checkpoint-1", "x": Evil()}))
    with pytest.raises(ValueError, match="not a readable bayesmeta checkpoint"):
        load_checkpoint(evil)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(torn)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_with_other_settings_is_refused(tmp_path):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5), prior_scale=0.2)
    learner = MetaLearner(model, "maml", inner_steps=1, inner_lr=0.01)
    learner.fit(Sinusoid(5, 5), meta_steps=2, meta_batch=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir holds a run"):
        learner.fit(
            Sinusoid(5, 5), meta_steps=4, meta_batch=8, checkpoint_dir=tmp_path, progress=False
        )


def test_cosine_schedule_resumes_only_at_its_own_length(tmp_path):
    model = HierarchicalBNN(MLP(1, [8], 1), Normal(0.5), prior_scale=0.2)
    learner = MetaLearner(model, "maml", inner_steps=1, inner_lr=0.01)
    fit = dict(meta_batch=4, checkpoint_dir=tmp_path, progress=False, lr_schedule="cosine")
    learner.fit(Sinusoid(5, 5), meta_steps=2, **fit)
    with pytest.raises(ValueError, match="'lr_schedule': 'cosine', 'meta_steps': 2"):
        learner.fit(Sinusoid(5, 5), meta_steps=4, **fit)
    with pytest.raises(ValueError, match="checkpoint_dir holds a run"):
        learner.fit(Sinusoid(5, 5), meta_steps=2, **{**fit, "lr_schedule": "constant"})
