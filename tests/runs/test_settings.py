"""Run settings (``bayesmeta.runs``): defaults, task presets, the data root, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bayesmeta.cli import main
from bayesmeta.data import omniglot, packaged_omniglot_root
from bayesmeta.inference import checkpoint
from bayesmeta.runs import default_inner_lr, settings, write_json, write_text


def test_omniglot_data_root_defaults_to_the_packaged_sets(
    tmp_path, monkeypatch, capsys, omniglot_root
):
    # No --data-root, no $BAYESMETA_DATA_ROOT, an empty working folder and no ../shared.
    monkeypatch.delenv("BAYESMETA_DATA_ROOT", raising=False)
    monkeypatch.setenv("BAYESMETA_SHARED", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert settings.resolve_data_root(None) == packaged_omniglot_root() == omniglot_root
    config = settings.default_config({"task": "omniglot", "queries": 1})
    assert config["data_root"] == str(omniglot_root)
    batch = settings.make_tasks(config, "test").sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 5, 1, 28, 28)
    # $BAYESMETA_DATA_ROOT and --data-root still win, in that order.
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("BAYESMETA_DATA_ROOT", str(other))
    assert settings.resolve_data_root(None) == other.resolve()
    assert settings.resolve_data_root(str(omniglot_root)) == omniglot_root
    for command in ("train", "bench"):
        assert main([command, "--help"]) == 0
        words = " ".join(capsys.readouterr().out.split())
        assert "$BAYESMETA_DATA_ROOT, else the small background sets that ship with" in words
        assert "shared" not in words
    # An install without its package data says so.
    monkeypatch.delenv("BAYESMETA_DATA_ROOT")
    monkeypatch.setattr(omniglot, "_PACKAGED", tmp_path / "gone")
    with pytest.raises(settings.UsageError, match=r"no Omniglot data found: .* is missing"):
        settings.resolve_data_root(None)


def test_default_inner_lr_follows_the_kind_of_step():
    # Plain steps are preconditioned by the prior, so map and maml share one size: on the
    # sinusoid the step of 0.003 on the NLL per point at noise 0.3 that the suites measured.
    assert default_inner_lr("sinusoid", "map") == default_inner_lr("sinusoid", "maml") == 1 / 30
    assert default_inner_lr("omniglot", "maml") == default_inner_lr("omniglot", "map") == 0.4
    # Natural steps are scaled by the posterior's variance; Newton steps are full steps.
    assert default_inner_lr("omniglot", "bayes") == 0.5
    assert default_inner_lr("omniglot", "bayes", update="gradient") == 0.4
    assert default_inner_lr("sinusoid", "bayes-head") == default_inner_lr("omniglot", "bayes-head")
    assert default_inner_lr("sinusoid", "bayes-head") == 1.0


def test_a_run_that_names_no_method_gets_the_tasks_measured_best():
    for task, preset in settings.TASK_PRESETS.items():
        given = {"task": task} if task == "sinusoid" else {"task": task, "data_root": "."}
        config = settings.default_config(given)
        assert {k: config[k] for k in preset} == preset
        # Naming a method drops the preset; any of its settings can be given on their own.
        config = settings.default_config({**given, "method": "maml", "meta_steps": 7})
        assert config["method"] == "maml" and config["meta_steps"] == 7
        assert config["meta_lr"] is None and config["lr_schedule"] == "constant"
    config = settings.default_config({"task": "omniglot", "data_root": ".", "meta_batch": 3})
    assert config["method"] == "bayes-proto" and config["meta_batch"] == 3


def test_write_text_is_atomic_and_keeps_ordinary_modes(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    write_text(path, "first\n")
    assert path.read_text() == "first\n"
    assert path.stat().st_mode & 0o777 == 0o666 & ~checkpoint._UMASK  # not mkstemp's 0600
    path.chmod(0o640)
    write_json(path, {"b": 1, "a": [2]})
    assert json.loads(path.read_text()) == {"a": [2], "b": 1}
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text(path, "never seen\n")
    assert json.loads(path.read_text()) == {"a": [2], "b": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary file left


def test_omniglot_runs_take_a_relative_prior_and_sinusoid_runs_one_scale(omniglot_root):
    config = settings.default_config(
        {"task": "omniglot", "method": "bayes", "data_root": str(omniglot_root)}
    )
    assert config["prior_scale"] == "relative"
    model = settings.make_learner(config).model
    sigma = {n: float(s.detach().mean()) for n, s in model.prior_scale().items()}
    for name, w in model.net.named_parameters():
        rms = float(w.detach().square().mean().sqrt())
        assert sigma[name] == pytest.approx(0.1 * rms if rms > 0 else 0.1, rel=1e-5), name
    config = settings.default_config({"task": "sinusoid", "method": "bayes"})
    scales = settings.make_learner(config).model.prior_scale().values()
    assert all(torch.allclose(s, torch.tensor(0.1)) for s in scales)
    assert main(["train", "--task", "sinusoid", "--prior-scale", "wide", "--out", "x"]) == 2
    settings.check_config({**config, "prior_scale": "relative"})
    with pytest.raises(ValueError, match="'prior_scale' must be a number or 'relative'"):
        settings.check_config({**config, "prior_scale": "wide"})


def test_a_run_may_name_a_guide_and_an_update_rule():
    config = settings.default_config(
        {"task": "sinusoid", "method": "bayes", "guide": "normal-local", "update": "ivon"}
    )
    learner = settings.make_learner(config)
    assert type(learner.guide).__name__ == "LocalNormalGuide"
    assert learner.inner.update.name == "ivon"
    with pytest.raises(settings.UsageError, match="guide must be one of .* got 'no-such'"):
        settings.make_learner({**config, "guide": "no-such"})
