"""The speed and scaling scripts of benchmarks/ run and report what they measured."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = [pytest.mark.slow, pytest.mark.integration]  # the scripts time child processes


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # (they import each other, as scripts do)
    yield lambda name: importlib.import_module(name)
    for name in ("bench_speed", "bench_distributed", "bench_memory"):
        sys.modules.pop(name, None)


def test_speed_bench_times_bayesmeta_against_the_per_task_loop(scripts):
    speed = scripts("bench_speed")
    impls = ["bayesmeta", "bayesmeta-bayes", "bayesmeta-bayes1", "loop"]
    out = speed.time_child(["sinusoid-2"], impls, 1, 1)
    rows = [{**r, "threads": out["threads"], "threads_setting": "1"} for r in out["rows"]]
    assert [r["impl"] for r in rows] == impls
    assert all(0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    text = speed.table(rows)
    assert text.count("\n") == 5 and "| sinusoid-2 |" in text
    assert "| 1.00x |" in text.splitlines()[2]  # bayesmeta maml against itself


def test_distributed_bench_reports_throughput_and_scaling(scripts):
    rows = scripts("bench_distributed").run([1, 2], [("sinusoid", "maml")], steps=1)
    assert [r["procs"] for r in rows] == [1, 2]
    assert all(r["tasks_per_s"] > 0 and len(r["times"]) == 1 for r in rows)
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert 0 < rows[1]["efficiency"] < 2
