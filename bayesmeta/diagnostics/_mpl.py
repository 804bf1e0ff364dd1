"""Lazy matplotlib: import it only when a plot is made, headless unless told otherwise."""

from __future__ import annotations

import os
import sys

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot``; picks the Agg backend when nothing chose one yet.

    A notebook (or ``MPLBACKEND``) that already set a backend keeps it.
    """
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
