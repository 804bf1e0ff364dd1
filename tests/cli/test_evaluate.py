"""``bayesmeta eval``'s report of the scores that ``evaluate`` holds."""

from __future__ import annotations

from bayesmeta.cli.evaluate import format_metrics
from bayesmeta.inference import Evaluation


def test_eval_prints_accuracy_as_a_percentage_of_the_fraction_evaluate_holds():
    scores = {"num_tasks": 600, "accuracy": 0.8934, "accuracy_ci": 0.0081, "nll": 0.3}
    lines = format_metrics(Evaluation({**scores, "ece": 0.02, "mce": 0.1, "brier": 0.15}))
    assert lines[0] == "accuracy  89.34% ± 0.81 (95% CI over tasks)"
