"""Run settings: one home for every default of a run, and for building its learner and its
task distributions from a saved configuration. The CLI and the benchmark suites both stand on
this layer (data → nets → models → inference → diagnostics → runs → bench → cli)."""

from bayesmeta.runs import settings
from bayesmeta.runs.settings import *  # noqa: F403 (exactly the names of settings.__all__)

__all__ = list(settings.__all__)
