"""Argument checks shared by the inference layer: one message shape for every bad option."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, alternatives: str = "") -> int:
    """``value`` if it is an int ≥ ``minimum`` (bools refused), else ``ValueError``;
    ``alternatives`` names the other values the caller accepts, for the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}{alternatives}, got {value!r}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
