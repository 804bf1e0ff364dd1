"""Peak resident memory of a stretch of code, by sampling the process's RSS in a thread.

``resource.getrusage(...).ru_maxrss`` is the peak of the whole process life, so it cannot tell
one benchmark row from the next in one process. :class:`PeakRSS` instead reads the current
resident set size (``/proc/self/statm``) every ``interval`` seconds while the code runs. It can
miss a spike shorter than the interval; it never counts memory the allocator only reserved.
Where ``/proc`` is missing (macOS) it falls back to ``ru_maxrss`` and says so in ``method``.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

__all__ = ["PeakRSS", "current_rss_mb", "max_rss_mb"]

_STATM = Path("/proc/self/statm")
_MB = 1024.0 * 1024.0


def current_rss_mb() -> float | None:
    """The process's resident set size now, in MiB (``None`` without ``/proc``)."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB


def max_rss_mb() -> float:
    """Peak resident set size of the process so far (``ru_maxrss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024.0  # bytes vs KiB


class PeakRSS:
    """Context manager: the peak RSS while its block runs.

    Parameters
    ----------
    interval : float
        Seconds between samples.

    Attributes
    ----------
    start_mb, peak_mb : float
        RSS when the block started and the largest sample while it ran (MiB).
    method : str
        How the numbers were taken, for the report.

    Examples
    --------
    >>> with PeakRSS() as mem:
    ...     work()
    >>> mem.peak_mb - mem.start_mb  # growth while ``work`` ran
    """

    def __init__(self, interval: float = 0.01) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._sampling = current_rss_mb() is not None
        if self._sampling:
            self.method = (
                f"RSS (/proc/self/statm) sampled every {1e3 * self.interval:g} ms in a thread; "
                "process-wide, so it includes memory still held from earlier rows"
            )
        else:
            self.method = "ru_maxrss: peak of the whole process so far (no /proc here)"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_mb()
            if rss is not None and rss > self.peak_mb:
                self.peak_mb = rss

    def __enter__(self) -> PeakRSS:
        if self._sampling:
            self.start_mb = self.peak_mb = current_rss_mb() or 0.0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="PeakRSS", daemon=True)
            self._thread.start()
        else:
            self.start_mb = self.peak_mb = max_rss_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)
        else:
            self.peak_mb = max_rss_mb()
