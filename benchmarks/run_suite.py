"""Run a benchmark suite: a thin wrapper of ``bayesmeta bench`` (same options).

    python benchmarks/run_suite.py --suite quick --out bench_out/quick

The suites live in :mod:`bayesmeta.bench.config` and the runner in :mod:`bayesmeta.bench.suite`;
``python benchmarks/run_suite.py --help`` lists the options.
"""

from __future__ import annotations

import sys

from bayesmeta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
