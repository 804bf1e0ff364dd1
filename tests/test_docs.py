"""The API reference builds from the docstrings (pdoc), with every warning an error, so a broken
docstring or a public name that does not resolve fails here."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # pdoc in a subprocess

MODULES = ["bayesmeta", "bayesmeta.diagnostics", "bayesmeta.runs", "bayesmeta.bench"]
#: The one command that builds the reference (docs/README.md names it too).
COMMAND = [sys.executable, "-W", "error", "-m", "pdoc", *MODULES, "--docformat", "numpy"]


def test_api_reference_builds_without_warnings(tmp_path):
    done = subprocess.run([*COMMAND, "-o", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for page in ("bayesmeta.html", "bayesmeta/inference.html", "bayesmeta/models.html",
                 "bayesmeta/nets.html", "bayesmeta/data.html", "bayesmeta/diagnostics.html",
                 "bayesmeta/runs.html", "bayesmeta/bench.html"):  # fmt: skip
        assert page in pages, sorted(pages)
    text = (tmp_path / "bayesmeta" / "inference.html").read_text()
    assert "MetaLearner" in text and "TaskPosterior" in text
