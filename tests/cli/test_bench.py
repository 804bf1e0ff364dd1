"""``bayesmeta bench``: running a suite from the command line, rendering, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torchvision

from bayesmeta.bench import run_suite
from bayesmeta.bench.suite import JSON_NAME, MARKDOWN_NAME
from bayesmeta.cli import main


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err
    return err.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_cli_bench_writes_and_renders(tmp_path, capsys, omniglot_root):
    out = tmp_path / "out"
    argv = ["bench", "--suite", "smoke", "--methods", "maml", "--out", str(out)]
    argv += ["--data-root", str(omniglot_root), "--no-speed", "--quiet"]
    assert main(argv) == 0
    assert str(out / JSON_NAME) in capsys.readouterr().out
    results = json.loads((out / JSON_NAME).read_text())
    assert results["command"].startswith("bayesmeta bench --suite smoke --methods maml")
    assert main(["bench", "--render", str(out / JSON_NAME)]) == 0
    assert capsys.readouterr().out == (out / MARKDOWN_NAME).read_text()
    assert main(["bench", "--render", str(out / JSON_NAME), "--heading-level", "3"]) == 0
    assert capsys.readouterr().out.startswith("### bayesmeta benchmark: `smoke` suite\n")
    assert main(["bench", "--render", str(out)]) == 0  # a finished run's folder: its JSON
    assert capsys.readouterr().out == (out / MARKDOWN_NAME).read_text()


def test_cli_bench_errors(tmp_path, capsys, monkeypatch):
    assert "invalid choice: 'huge'" in _error(["bench", "--suite", "huge"], capsys)
    assert "invalid choice: 'nope'" in _error(["bench", "--methods", "maml", "nope"], capsys)
    assert "--threads must be a positive int" in _error(["bench", "--threads", "0"], capsys)
    assert "--workers must be a positive int" in _error(["bench", "--workers", "0"], capsys)
    err = _error(["bench", "--suite", "full"], capsys)
    assert "pass --data-root" in err

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", offline)
    err = _error(["bench", "--suite", "full", "--data-root", str(tmp_path / "new")], capsys)
    assert "cannot download Omniglot's images_background" in err
    err = _error(["bench", "--render", str(tmp_path / "missing.json")], capsys)
    assert "cannot read a results JSON" in err
    missing = tmp_path / "missing"
    assert "is not a folder" in _error(
        ["bench", "--suite", "smoke", "--data-root", str(missing)], capsys
    )
    with pytest.raises(ValueError, match="suite must be one of"):
        run_suite("huge")
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        run_suite("smoke", ["nope"])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("first", ["bayesmeta.bench", "bayesmeta.cli"])
def test_bench_and_cli_import_in_either_order(first):
    code = f"import {first}, bayesmeta.bench.suite, bayesmeta.cli.bench"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_runner_script_is_the_cli():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_suite.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: bayesmeta bench"), done.stderr
