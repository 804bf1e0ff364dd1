"""CI runs exactly the README's test command: installing, linting, checking the formatting and
running every test tier, nothing more and nothing less."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE = (
    'python -m pip install -e ".[dev]" && ruff check . && ruff format --check . '
    "&& python -m pytest -q"
)


def _ci_command() -> str:
    """The one command line of .ci/run, past its shebang, comments, ``set`` and ``cd``."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert len(lines) == 1, lines
    return lines[0]


def _readme_test_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    tests = [block.strip() for block in blocks if "pytest" in block]
    assert len(tests) == 1, tests
    return tests[0]


def test_ci_runs_exactly_the_readme_test_command():
    assert _ci_command() == _readme_test_command()


def test_the_gate_installs_lints_checks_the_formatting_then_runs_every_tier():
    assert _ci_command() == GATE  # no -m: the slow and integration tiers run too
