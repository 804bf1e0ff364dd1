"""Diagnostics: ArviZ ``InferenceData`` from task posteriors and MCMC, calibration, plots.

ArviZ and matplotlib are imported lazily, inside the functions that need them (matplotlib with
the Agg backend unless one was chosen), so ``import bayesmeta.diagnostics`` stays cheap.
"""

from bayesmeta.diagnostics.arviz_io import MAX_POSTERIOR_SIZE, from_mcmc, to_inference_data
from bayesmeta.diagnostics.calibration import (
    auroc,
    brier_score,
    calibration_bins,
    coverage_table,
    expected_calibration_error,
    interval_coverage,
    mean_ci,
    predictive_entropy,
    reliability_diagram,
    risk_coverage,
)
from bayesmeta.diagnostics.compare import compare_learners, compare_posteriors, forest_plot
from bayesmeta.diagnostics.plots import ppc_plot, predictive_band_plot

__all__ = [
    "MAX_POSTERIOR_SIZE",
    "to_inference_data",
    "from_mcmc",
    "compare_posteriors",
    "forest_plot",
    "compare_learners",
    "reliability_diagram",
    "coverage_table",
    "predictive_entropy",
    "predictive_band_plot",
    "ppc_plot",
    "expected_calibration_error",
    "calibration_bins",
    "brier_score",
    "interval_coverage",
    "mean_ci",
    "auroc",
    "risk_coverage",
]
