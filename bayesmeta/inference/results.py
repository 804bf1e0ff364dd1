"""The result of :func:`~bayesmeta.inference.evaluate`: scores that read as a dict and print as a
table.

One convention for accuracy: the values (and so any JSON written from them) are fractions in
``[0, 1]``; only the printed table shows accuracy as a percentage, with a ``%`` sign.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["Evaluation"]

#: Scores held as fractions and printed as percentages.
_PERCENT = frozenset({"accuracy"})
#: Suffix of a score's 95% confidence-interval half-width (printed on the score's line).
_CI = "_ci"


def _is_count(name: str) -> bool:
    return name.startswith("num_")


class Evaluation(Mapping[str, "float | int"]):
    """Scores of a learner on held-out tasks: a read-only mapping that prints as a table.

    Indexing, ``in``, :meth:`keys`, :meth:`items`, iteration, ``len`` and ``==`` behave as
    on the plain dict :meth:`to_dict` returns. Counts (keys beginning ``num_``, such as
    ``num_tasks``) are ints, every other value a float; accuracy is a fraction in ``[0, 1]``
    and its half-width ``accuracy_ci`` a fraction too.

    Parameters
    ----------
    scores : Mapping[str, float]
        Score name to value. A key ``"<name>_ci"`` is the half-width of the 95% confidence
        interval over tasks of ``"<name>"``.

    Raises
    ------
    TypeError
        If a name is not a str, or a value is not a real number.
    ValueError
        If a count is not a whole number.

    Examples
    --------
    >>> result = Evaluation({"num_tasks": 600, "accuracy": 0.893, "accuracy_ci": 0.008})
    >>> result["accuracy"], result["num_tasks"]
    (0.893, 600)
    >>> print(result)
    accuracy     89.3%  ± 0.8
    num_tasks      600
    """

    __slots__ = ("_scores",)

    def __init__(self, scores: Mapping[str, Any]) -> None:
        values: dict[str, float | int] = {}
        for name, value in scores.items():
            if not isinstance(name, str):
                raise TypeError(f"score names must be str, got {name!r} ({type(name).__name__})")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"score {name!r} must be a real number, got {value!r} ({type(value).__name__})"
                ) from None
            if _is_count(name):
                if not number.is_integer():
                    raise ValueError(f"count {name!r} must be a whole number, got {value!r}")
                values[name] = int(number)
            else:
                values[name] = number
        self._scores = values

    def __getitem__(self, name: str) -> float | int:
        return self._scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def __reduce__(self) -> tuple[type, tuple[dict[str, float | int]]]:
        return type(self), (self._scores,)

    def to_dict(self) -> dict[str, float | int]:
        """A new plain dict of the scores (JSON-able: str keys, int counts, float scores)."""
        return dict(self._scores)

    def __repr__(self) -> str:
        """One line per score: its name, its value to 3 significant digits (accuracy as a
        percentage), ``± half-width`` to as many decimals where there is one; counts last,
        as integers."""
        shown = [n for n in self._scores if not (n.endswith(_CI) and n[: -len(_CI)] in self)]
        shown.sort(key=_is_count)  # (stable: the scores in their order, then the counts)
        if not shown:
            return "Evaluation({})"
        width = max(map(len, shown))
        lines = []
        for name in shown:
            value, ci = self._scores[name], self._scores.get(name + _CI)
            if _is_count(name):
                text, spread = f"{value:d}", ""
            else:
                scale, sign = (100.0, "%") if name in _PERCENT else (1.0, "")
                text, spread = _with_spread(scale * value, None if ci is None else scale * ci)
                text += sign
            lines.append(f"{name:<{width}}  {text:>7}{spread}".rstrip())
        return "\n".join(lines)


def _with_spread(value: float, ci: float | None, digits: int = 3) -> tuple[str, str]:
    """``value`` to ``digits`` significant digits (fixed point unless very large or very small:
    ``89.3``, ``0.123``, ``1.23e-05``) and ``"  ± ci"`` to as many decimals (or ``""``)."""
    if not math.isfinite(value) or value == 0.0:
        decimals = digits  # (no magnitude to go by)
    else:
        magnitude = math.floor(math.log10(abs(value)))
        if magnitude >= 6 or magnitude < -4:
            return f"{value:.{digits - 1}e}", "" if ci is None else f"  ± {ci:.1e}"
        decimals = max(digits - 1 - magnitude, 0)
    return f"{value:.{decimals}f}", "" if ci is None else f"  ± {ci:.{decimals}f}"
