"""The ``bayesmeta`` command line, called in-process through ``main(argv)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bayesmeta.cli import main
from bayesmeta.runs import settings

TINY = (
    "--task sinusoid --method bayes --hidden 6 --meta-batch 2 --inner-steps 1 --shots 4 "
    "--queries 5 --val-every 0 --quiet"
).split()


def _train(out: Path, *extra: str, steps: int = 2) -> int:
    return main(["train", *TINY, "--meta-steps", str(steps), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert _train(out, "--checkpoint-every", "1") == 0
    return out


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["diagnose"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bayesmeta")
    if command == ["train"]:
        assert "--meta-steps" in out and "--resume" in out and "--force" in out


@pytest.mark.slow
@pytest.mark.integration
def test_end_to_end(run_dir, capsys):
    for name in ("checkpoint.pt", "config.json", "history.json", "learner.pt"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "sinusoid" and config["method"] == "bayes"
    assert config["hidden"] == "6" and config["meta_steps"] == 2
    assert len(json.loads((run_dir / "history.json").read_text())) == 2

    assert main(["eval", str(run_dir), "--num-tasks", "6", "--meta-batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "MSE" in out and "coverage" in out and "eval.json" in out
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert f"CRPS      {metrics['crps']:.4f}" in out
    assert {"mse", "mse_ci", "nll", "coverage_90"} <= set(metrics)

    argv = ["diagnose", str(run_dir)] + (
        "--num-tasks 3 --num-draws 10 --mcmc --mcmc-samples 6 --mcmc-warmup 4 --mcmc-chains 1"
    ).split()
    assert main(argv) == 0
    diag = run_dir / "diagnostics"
    assert str(diag) in capsys.readouterr().out
    for name in ("band.png", "ppc.png", "forest.png"):
        with Image.open(diag / name) as im:
            im.verify()
            assert im.size[0] >= 300 and im.size[1] >= 200, (name, im.size)
    for name in ("summary.csv", "coverage.csv", "svi_vs_mcmc.csv", "mcmc_summary.csv"):
        assert (diag / name).stat().st_size > 0, name
    report = (diag / "report.md").read_text()
    for link in ("band.png", "ppc.png", "forest.png", "summary.csv", "elpd_loo"):
        assert link in report

    assert main(["diagnose", str(run_dir), "--num-tasks", "2", "--num-draws", "5"]) == 0
    assert not (diag / "forest.png").exists()  # no stale output of the --mcmc run
    assert "forest.png" not in (diag / "report.md").read_text()


def test_resume_continues_and_checks_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, steps=1) == 0
    assert main(["train", "--out", str(out), "--resume", "--meta-steps", "2", "--quiet"]) == 0
    assert len(json.loads((out / "history.json").read_text())) == 2
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--hidden", "9", "--quiet"]) == 2
    assert "--hidden 9 differs" in capsys.readouterr().err


def test_cosine_lr_schedule_is_saved_and_fixes_the_run_length(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--lr-schedule", "cosine", steps=2) == 0
    assert json.loads((out / "config.json").read_text())["lr_schedule"] == "cosine"
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--meta-steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--meta-steps 3 differs from the saved run's 2" in err and "cosine" in err


def test_force_overwrites_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, steps=1) == 0
    assert main(["eval", str(out), "--num-tasks", "2", "--meta-batch", "2"]) == 0
    assert _train(out, steps=1) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert _train(out, "--force", steps=1) == 0
    assert not (out / "eval.json").exists()


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 or err.startswith("usage:"), err
    return err


def test_errors(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing"
    assert "no run folder" in _error(["eval", str(missing)], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a bayesmeta run folder" in _error(["diagnose", str(empty)], capsys)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    assert "corrupt run folder" in _error(["eval", str(corrupt)], capsys)
    (corrupt / "config.json").write_text(json.dumps({"task": "sinusoid"}))
    (corrupt / "learner.pt").write_bytes(b"garbage")
    assert "corrupt run folder" in _error(["eval", str(corrupt)], capsys)

    assert "invalid choice: 'mnist'" in _error(["train", "--task", "mnist"], capsys)
    assert "invalid choice: 'nope'" in _error(["train", "--method", "nope"], capsys)
    assert "not allowed with" in _error(["train", "--resume", "--force"], capsys)

    err = _error(["train", "--task", "omniglot", "--data-root", str(empty)], capsys)
    assert "cannot read Omniglot from data root" in err and str(empty) in err
    monkeypatch.setenv("BAYESMETA_DATA_ROOT", str(empty))  # overrides the packaged sets
    err = _error(["train", "--task", "omniglot"], capsys)
    assert "cannot read Omniglot from data root" in err and str(empty) in err
    monkeypatch.setenv("BAYESMETA_DATA_ROOT", str(missing))
    err = _error(["train", "--task", "omniglot"], capsys)
    assert f"$BAYESMETA_DATA_ROOT={missing} is not a folder" in err

    err = _error(["train", *TINY, "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert "--resume: no checkpoint" in err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    assert "refusing" in _error(["train", *TINY, "--out", str(stranger), "--force"], capsys)
    assert (stranger / "notes.txt").exists()
    assert "positive int" in _error(
        ["train", *TINY, "--out", str(tmp_path / "x"), "--meta-steps", "0"], capsys
    )


@pytest.mark.slow
@pytest.mark.integration
def test_diagnose_refuses_mcmc_on_a_large_net_before_touching_the_last_report(tmp_path, capsys):
    out = tmp_path / "wide"
    assert _train(out, "--hidden", "300,300", steps=1) == 0
    assert main(["diagnose", str(out), "--num-tasks", "2", "--num-draws", "5"]) == 0
    err = capsys.readouterr().err
    assert "bayesmeta diagnose: adapting 2 held-out tasks" in err
    # Every stage that can take minutes says how far it is.
    assert "bayesmeta diagnose:   20/20 draws on the query points" in err
    assert "bayesmeta diagnose:   20/20 draws on the support points" in err
    report = (out / "diagnostics" / "report.md").read_text()
    err = _error(["diagnose", str(out), "--mcmc"], capsys)
    assert "--mcmc needs a small network" in err
    assert (out / "diagnostics" / "report.md").read_text() == report


@pytest.mark.slow
@pytest.mark.integration
def test_threads_and_help_texts(run_dir, capsys):
    assert "must be a positive int, got 0" in _error(
        ["eval", str(run_dir), "--threads", "0"], capsys
    )
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out
    before = torch.get_num_threads()
    try:
        assert _train(run_dir.parent / "threads", "--threads", "1", steps=1) == 0
        argv = ["eval", str(run_dir), "--num-tasks", "2", "--threads", "1", "--quiet"]
        assert main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_help_states_the_defaults_it_uses(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    presets = settings.TASK_PRESETS
    methods = f"[{presets['sinusoid']['method']}* / {presets['omniglot']['method']}*]"
    assert methods in text
    steps = f"[{presets['sinusoid']['meta_steps']}* / {presets['omniglot']['meta_steps']}*]"
    assert steps in text
    assert f"gradient {settings.DEFAULTS['omniglot']['inner_lr']['gradient']:.3g}" in text
    assert f"task distribution [{settings.GENERAL_DEFAULTS['task']}]" in text


def test_without_threads_the_cli_leaves_the_cores_that_others_keep_busy(monkeypatch):
    import argparse

    import bayesmeta.cli as cli

    before = torch.get_num_threads()
    monkeypatch.setattr(cli, "usable_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    for busy in (0, 1, 3, 9):
        monkeypatch.setattr(cli, "busy_cores", lambda busy=busy: busy)
        cli._set_threads(argparse.Namespace(command="train", threads=None))
    assert chosen == [3, 1, 1]  # an idle machine keeps torch's setting
    cli._set_threads(argparse.Namespace(command="train", threads=2))
    assert chosen[-1] == 2
    monkeypatch.undo()
    assert torch.get_num_threads() == before
