"""The README is a user's guide that works: its code runs, its two commands are CI's, and its
results (and the reports in docs/) are generated from the suites' results files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bayesmeta.bench.report import BLOCK_BEGIN
from bayesmeta.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


#: Documents whose python blocks are run as a user would paste them.
RUNNABLE = ["README.md", "docs/extending.md"]


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_is_a_short_guide_whose_test_command_is_ci_s():
    assert len(README.splitlines()) <= 220
    bash = _blocks("bash")
    install_and_test = (
        'python -m pip install -e ".[dev]" && ruff check . && ruff format --check . '
        "&& python -m pytest -q"
    )
    assert install_and_test in bash[1]
    assert bash[1].strip() in (ROOT / ".ci" / "run").read_text()
    assert bash[0].strip().startswith("python -m pip install -e . && bayesmeta bench --suite")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    "document, index",
    [
        (document, index)
        for document in RUNNABLE
        for index in range(len(_blocks("python", (ROOT / document).read_text())))
    ],
)
def test_readme_python_block_runs(document, index, tmp_path, monkeypatch):
    # Each block runs on its own, as a user pastes it, from an empty folder: the images read
    # the packaged Omniglot sets, nothing beside the checkout.
    code = _blocks("python", (ROOT / document).read_text())[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{document} python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("document", ["README.md", "docs/benchmarks.md"])
def test_generated_results_blocks_are_their_commands_output(document, tmp_path, monkeypatch):
    # Rerunning the command each block names (paths relative to the checkout) leaves the
    # document as it is.
    text = (ROOT / document).read_text()
    begins = [line for line in text.splitlines() if line.startswith(BLOCK_BEGIN)]
    assert begins, f"{document} holds generated results blocks"
    (tmp_path / "docs").mkdir()
    for path in (ROOT / "docs").iterdir():
        (tmp_path / "docs" / path.name).symlink_to(path)
    target = tmp_path / document
    target.unlink(missing_ok=True)
    target.write_text(text)
    monkeypatch.chdir(tmp_path)
    for begin in begins:
        command = shlex.split(begin.split("`")[1])
        assert command[:3] == ["bayesmeta", "bench", "--render"]
        assert command[3].startswith("docs/") and begin.startswith(f"{BLOCK_BEGIN} {command[3]} ")
        assert command[-2:] == ["--into", document]
        assert main(command[1:]) == 0
        assert target.read_text() == text


def test_the_summary_is_one_table_per_kind_of_task():
    import json

    from bayesmeta.bench.report import render_summary

    results = json.loads((ROOT / "docs" / "results_quick.json").read_text())
    text = render_summary(results)
    assert text.count("| family | method |") == 2
    assert "**regression** (headline scores: in range)" in text
    assert (
        "| family | method | accuracy % | NLL | ECE | within-alphabet % | OOD AUROC (MI) |" in text
    )
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| omniglot-") or line.startswith("| sinusoid-")
    ]
    assert len(rows) == len(results["rows"])
