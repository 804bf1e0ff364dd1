"""Peak memory measured beside a benchmark row."""

from __future__ import annotations

import mmap
import time

from bayesmeta.bench.memory import PeakRSS


def test_peak_rss_sees_a_large_allocation():
    # An anonymous mapping is always fresh pages; a tensor could reuse memory that an earlier
    # test left resident, which would not raise the RSS at all.
    size = 64 * 1024 * 1024
    with PeakRSS(interval=0.005) as mem:
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)  # touch every page
        deadline = time.monotonic() + 5.0  # a loaded machine may delay the sampling thread
        while mem.peak_mb - mem.start_mb < 48 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    assert mem.peak_mb - mem.start_mb >= 48
