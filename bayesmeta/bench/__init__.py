"""Benchmark suite and speed measurements (top layer: may import everything).

:func:`run_suite` runs a suite of :data:`SUITES` and returns (and writes) its results JSON;
:func:`render_markdown` turns that JSON into the Markdown report.
"""

from bayesmeta.bench.config import SUITE_METHODS, SUITES, Budget, Family, SpeedGrid, Suite
from bayesmeta.bench.report import render_markdown, render_rows, render_tables
from bayesmeta.bench.runner import Execution
from bayesmeta.bench.suite import run_suite

__all__ = [
    "run_suite",
    "Execution",
    "render_markdown",
    "render_rows",
    "render_tables",
    "SUITES",
    "SUITE_METHODS",
    "Suite",
    "Family",
    "Budget",
    "SpeedGrid",
]
