"""Mean ± standard deviation over training seeds of suite rows, as Markdown tables.

    python benchmarks/seed_table.py RESULTS.json [RESULTS.json ...] [--methods M ...]

Each file is a suite's ``results.json`` (``bayesmeta bench --seed S``); rows of the same family
and method from different files are one method's seeds. Classification rows show accuracy,
NLL, ECE on the headline condition, within-alphabet accuracy, and the out-of-episode AUROC of
the score that is best on average over the seeds (``bayesmeta.inference.evaluate_out_of_episode``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

from bayesmeta.bench.config import SUITE_METHODS

_OOE = {"entropy": "H", "mutual_information": "MI", "neg_max_logit": "−max", "energy": "E"}
_CLASSIFICATION = [
    ("accuracy %", None, "accuracy", 100.0, 1),
    ("NLL", None, "nll", 1.0, 3),
    ("ECE", None, "ece", 1.0, 3),
    ("within-alphabet %", "unseen_within_alphabet", "accuracy", 100.0, 1),
]
_REGRESSION = [
    ("MSE", None, "mse", 1.0, 3),
    ("NLL", None, "nll", 1.0, 2),
    ("90% coverage", None, "coverage_90", 1.0, 3),
    ("CRPS", None, "crps", 1.0, 3),
]


def _cell(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _ooe_cell(rows: list[dict]) -> str:
    """The out-of-episode AUROC of the score best on average, and which score it is."""
    found = [r["out_of_episode"] for r in rows if "auroc_energy" in r.get("out_of_episode", {})]
    if len(found) < len(rows):
        return "n/a"
    best = max(_OOE, key=lambda s: statistics.fmean(f[f"auroc_{s}"] for f in found))
    return f"{_cell([f[f'auroc_{best}'] for f in found], 1.0, 3)} ({_OOE[best]})"


def seed_tables(results: list[dict], methods: list[str] | None = None) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for result in results:
        for row in result["rows"]:
            if row.get("error") is None and (methods is None or row["method"] in methods):
                groups[(row["family"], row["method"])].append(row)
    order = {m: i for i, m in enumerate(SUITE_METHODS)}
    families = list(dict.fromkeys(f for f, _ in groups))
    out = []
    for family in families:
        keys = sorted((k for k in groups if k[0] == family), key=lambda k: order.get(k[1], 99))
        kind = groups[keys[0]][0]["kind"]
        columns = _CLASSIFICATION if kind == "classification" else _REGRESSION
        header = ["method", "seeds", *(c[0] for c in columns)]
        if kind == "classification":
            header.append("OOE AUROC (best score)")
        out += [f"**{family}**", "", "| " + " | ".join(header) + " |"]
        out.append("|" + "---|" * len(header))
        for key in keys:
            rows = groups[key]
            cells = [key[1], str(len(rows))]
            for _, condition, metric, scale, digits in columns:
                values = [
                    r["evaluations"][condition or r["headline"]][metric]
                    for r in rows
                    if (r["evaluations"].get(condition or r["headline"]) or {}).get(metric)
                    is not None
                ]
                cells.append(_cell(values, scale, digits))
            if kind == "classification":
                cells.append(_ooe_cell(rows))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files, one per seed")
    parser.add_argument("--methods", nargs="+", help="only these methods")
    args = parser.parse_args()
    results = [json.loads(open(path).read()) for path in args.results]
    print(seed_tables(results, args.methods))


if __name__ == "__main__":
    main()
