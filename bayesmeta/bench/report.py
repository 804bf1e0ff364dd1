"""Markdown tables of a results JSON (what ``results.md`` and the README section hold).

Everything here reads only the JSON, so a table can be regenerated from a saved file:
``bayesmeta bench --render docs/results_quick.json``.
"""

from __future__ import annotations

import math
from typing import Any

from bayesmeta.bench.config import SUITE_METHODS
from bayesmeta.bench.tasks import family_spec

__all__ = [
    "render_markdown",
    "render_summary",
    "render_rows",
    "render_tables",
    "splice_report",
    "REQUIRED_TEST_TASKS",
    "BLOCK_BEGIN",
    "BLOCK_END",
]

#: Test tasks a reported number needs; rows with fewer are marked.
REQUIRED_TEST_TASKS = 600
_MARK = "†"
#: Marks the wall time of a row whose meta-training continued from a checkpoint.
_RESUMED = "§"
_VERSION_ORDER = ("python", "torch", "pyro", "bayesmeta", "code")
#: The markers around a generated report inside a Markdown file (a README's results section).
#: The begin marker's line also names the command that wrote the block, so a reader, or a test,
#: can run it again and compare.
BLOCK_BEGIN = "<!-- bench:begin"
BLOCK_END = "<!-- bench:end -->"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if abs(value) >= 1e5:  # a diverged adaptation: the size is what matters
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else _num(100.0 * value, digits)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _common(row: dict[str, Any]) -> list[str]:
    training, memory = row["training"], row["memory"]
    resumed = _RESUMED if training.get("resumed_from_step") else ""
    return [
        _num(training["tasks_per_second"], 0),
        _num(row["wall_seconds"], 0) + resumed,
        _num(memory["peak_rss_mb"], 0),
    ]


#: Marks a row whose queries were normalised with their own batch's statistics.
_TRANSDUCTIVE = "ᵀ"


def _transductive(row: dict[str, Any]) -> bool:
    # Rows written before the setting existed were transductive.
    # Only image tasks normalise their query batches (their networks' batch statistics).
    return row["config"].get("transductive", True) and family_spec(row["task"]).run.classes


def _label(row: dict[str, Any]) -> list[str]:
    mark = _MARK if row["config"]["test_tasks"] < REQUIRED_TEST_TASKS else ""
    return [row["family"] + mark, row["method"] + (_TRANSDUCTIVE if _transductive(row) else "")]


def _failed(row: dict[str, Any], width: int) -> list[str] | None:
    """The table row of a run whose headline test has no scores (see the notes below it)."""
    if row["evaluations"].get(row["headline"]) is None:
        return [*_label(row), "failed ‡"] + ["–"] * (width - 6) + _common(row)
    return None


def _score(scores: dict[str, float] | None, key: str, scale: float = 1.0) -> str:
    """One score of a test condition, ``"failed ‡"`` when the condition has none."""
    return "failed ‡" if scores is None else _num(scale * scores[key], 1 if scale > 1 else 3)


#: The score columns of each kind of row, between the labels and the common columns.
_HEADERS = {
    "classification": [
        "accuracy % ± 95% CI",
        "NLL",
        "ECE",
        "Brier",
        "AURC",
        "within-alphabet %",
        "accuracy % seen",
        "OOD AUROC H / MI",
        "OOE AUROC H / MI / −max / E",
    ],
    "regression": [
        "MSE ± 95% CI",
        "curve MSE",
        "NLL",
        "CRPS",
        "90% coverage",
        "OOD MSE",
        "OOD 90% coverage",
        "OOD AUROC H / MI",
    ],
}


def _aurocs(row: dict[str, Any]) -> str:
    ood = row["ood"]
    return f"{_num(ood.get('auroc_entropy'))} / {_num(ood.get('auroc_mutual_information'))}"


#: Out-of-episode scores, as the tables abbreviate them.
_OOE_SHORT = {
    "entropy": "H",
    "mutual_information": "MI",
    "neg_max_logit": "−max",
    "energy": "E",
}


def _ooe_all(row: dict[str, Any]) -> str:
    ooe = row.get("out_of_episode")
    if not ooe or "error" in ooe:
        return "–"
    return " / ".join(_num(ooe.get(f"auroc_{s}")) for s in _OOE_SHORT)


def _ooe_best(row: dict[str, Any]) -> str:
    """The best out-of-episode AUROC of a row, and by which score."""
    ooe = row.get("out_of_episode")
    if not ooe or "error" in ooe:
        return "–"
    score = max(_OOE_SHORT, key=lambda s: ooe.get(f"auroc_{s}", float("-inf")))
    return f"{_num(ooe[f'auroc_{score}'])} ({_OOE_SHORT[score]})"


def _scores(row: dict[str, Any]) -> list[str]:
    """The score cells of a row whose headline test has scores (see ``_HEADERS``)."""
    return _SCORES[row["kind"]](row, row["evaluations"], row["evaluations"][row["headline"]])


def _classification_scores(row, evaluations, test) -> list[str]:
    ref = evaluations.get(row["ood"]["reference"])
    within = evaluations.get("unseen_within_alphabet", {})
    return [
        f"{_pct(test['accuracy'])} ± {_pct(test['accuracy_ci'])}",
        _num(test["nll"]),
        _num(test["ece"]),
        _num(test["brier"]),
        _num(test.get("aurc")),
        "failed ‡" if within is None else _pct(within.get("accuracy")),
        _score(ref, "accuracy", 100.0),
        _aurocs(row),
        _ooe_all(row),
    ]


def _regression_scores(row, evaluations, test) -> list[str]:
    ood = evaluations.get(row["ood"]["shifted"])
    return [
        f"{_num(test['mse'])} ± {_num(test['mse_ci'])}",
        _num(test.get("function_mse")),
        _num(test["nll"]),
        _num(test.get("crps")),
        _num(test["coverage_90"]),
        _score(ood, "mse"),
        _score(ood, "coverage_90"),
        _aurocs(row),
    ]


#: The score cells of a row, by its kind (the columns of ``_HEADERS``).
_SCORES = {"classification": _classification_scores, "regression": _regression_scores}


def _results_table(rows: list[dict[str, Any]], kind: str) -> list[str]:
    header = ["family", "method", *_HEADERS[kind], "train tasks/s", "wall s", "peak RSS MiB"]
    body = [
        _failed(row, len(header)) or [*_label(row), *_scores(row), *_common(row)] for row in rows
    ]
    return _table(header, body)


def _method_costs(rows: list[dict[str, Any]]) -> list[str]:
    header = ["task", "backbone", "T", "method", "ms per meta-step", "× maml"]
    body = [
        [
            r["task"] + _shape(r["shape"]),
            r["backbone"],
            str(r["T"]),
            method,
            _num(ms, 1),
            _num(r["vs_maml"].get(method), 2) + "x",
        ]
        for r in rows
        for method, ms in r["ms_per_step"].items()
    ]
    return _table(header, body)


def _speed(rows: list[dict[str, Any]]) -> list[str]:
    extra = [n for n in ("learn2learn", "higher") if any(f"speedup_vs_{n}" in r for r in rows)]
    header = ["task", "backbone", "T", "inner steps", "order", "batched ms", "per-task ms"]
    header += ["speedup vs per-task", *(f"speedup vs {n}" for n in extra), "batched tasks/s"]
    body = []
    for r in rows:
        ms = r["ms_per_step"]
        body.append(
            [
                r["task"] + _shape(r["shape"]),
                r["backbone"],
                str(r["T"]),
                str(r["inner_steps"]),
                r["order"],
                _num(ms["batched"], 1),
                _num(ms["per_task"], 1),
                _num(r["speedup_vs_per_task"], 2) + "x",
                *(_num(r.get(f"speedup_vs_{n}"), 2) + "x" for n in extra),
                _num(r["batched_tasks_per_second"], 0),
            ]
        )
    return _table(header, body)


def _shape(shape: dict[str, Any]) -> str:
    """`` (5-way 1-shot, 5 queries)`` for a speed row's task shape."""
    ways = f"{shape['ways']}-way " if shape.get("ways") else ""
    per = " per class" if shape.get("ways") else ""
    return f" ({ways}{shape['shots']}-shot, {shape['queries']} queries{per})"


def _conditions(rows: list[dict[str, Any]]) -> list[str]:
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["family"], row)
    lines = []
    for family, row in first.items():
        text = "; ".join(f"`{k}`: {v}" for k, v in row["conditions"].items())
        notes = "".join(f" {n[0].upper()}{n[1:]}." for n in row.get("notes", []))
        lines.append(f"- **{family}**: {text}. Gap: {row['ood']['gap_definition']}.{notes}")
    return lines


#: Each kind of row's legend, in the order of the tables.
_LEGENDS = {
    "regression": (
        "Regression: MSE against the noisy query targets, *curve MSE* against the "
        "noise-free function (Finn et al.'s sinusoid MSE; the MSE exceeds it by about the "
        "noise variance), NLL, CRPS and coverage of the central 90% predictive interval on "
        "amplitudes inside the meta-training range; OOD on amplitudes outside it. *OOD "
        "AUROC*: how well a query's predictive entropy (H) or mutual information with the "
        "weights (MI, its epistemic part) tells out-of-range from in-range queries (0.5 is "
        "chance; a point estimate with fixed noise scores 0.5). – where the run predates "
        "the number."
    ),
    "classification": (
        "Classification: accuracy, NLL, ECE (15 bins), Brier and AURC (area under the "
        "risk-coverage curve of answering the most confident queries first; lower is "
        "better) on the headline test condition (unseen alphabets for Omniglot); "
        "*within-alphabet*: tasks whose characters all come from one unseen alphabet; "
        "*accuracy % seen* on the reference condition; *OOD AUROC*: how well a query's "
        "predictive entropy (H) or mutual information (MI) tells unseen-alphabet from "
        "seen-alphabet queries. Every query is predicted from its task's support set alone "
        f"(non-transductive), except in rows marked {_TRANSDUCTIVE}, whose query batches "
        "were normalised with their own statistics (as in earlier versions and some papers)."
    ),
}


def render_tables(results: dict[str, Any]) -> str:
    """The classification, regression and speed tables of ``results``, with their legends."""
    rows = results["rows"]
    out: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    for kind, legend in _LEGENDS.items():
        if by_kind.get(kind):
            out += [legend, "", *_results_table(by_kind[kind], kind), ""]
    out += ["Test conditions:", "", *_conditions(rows), ""]
    out += _footnotes(results)
    out += _speed_sections(results.get("speed", []))
    return "\n".join(out)


def _footnotes(results: dict[str, Any]) -> list[str]:
    """What did not run, which numbers are not reportable, resumed rows and what failed."""
    rows, out = results["rows"], []
    not_run = results.get("not_run") or []
    if not_run:
        out += ["Not run:", ""]
        out += [f"- {r['family']}/{r['method']}: {r['reason']}" for r in not_run]
        out.append("")
    if any(r["config"]["test_tasks"] < REQUIRED_TEST_TASKS for r in rows):
        out += [
            f"{_MARK} fewer than {REQUIRED_TEST_TASKS} test tasks (smoke budget): the CIs are "
            "not reportable numbers.",
            "",
        ]
    resumed = [r for r in rows if r["training"].get("resumed_from_step")]
    if resumed:
        out += [
            f"{_RESUMED} Meta-training continued from a checkpoint of a killed run; *wall s* "
            "counts only the sitting that finished the row (*train tasks/s* counts every step):",
            "",
        ]
        out += [
            f"- {r['family']}/{r['method']}: from step {r['training']['resumed_from_step']} "
            f"of {r['training']['meta_steps']}"
            for r in resumed
        ]
        out.append("")
    failed = [r for r in rows if r["error"]]
    if failed:
        out += ["‡ What went wrong (the run's other numbers stand):", ""]
        out += [f"- {r['family']}/{r['method']}: {r['error']}" for r in failed]
        out.append("")
    return out


def _speed_sections(speed: list[dict[str, Any]]) -> list[str]:
    """The speed grid's table and the methods' costs, with their legends."""
    out: list[str] = []
    loops = [r for r in speed if r.get("kind") != "method_cost"]
    costs = [r for r in speed if r.get("kind") == "method_cost"]
    if loops:
        out += [
            "Speed: milliseconds per meta-step (median of interleaved repeats, same process, "
            "same batch); speedup = per-task ms / batched ms (MAML for second order, FOMAML "
            "for first).",
            "",
            *_speed(loops),
            "",
        ]
    if costs:
        out += [
            "Cost of each method per meta-step as the suite trains it (its options and the "
            "family's budget; median of interleaved repeats, same batch), against maml:",
            "",
            *_method_costs(costs),
            "",
        ]
    return out


def render_markdown(results: dict[str, Any], heading_level: int = 1) -> str:
    """A Markdown report of ``results``: what ran, where, and :func:`render_tables`."""
    h = "#" * heading_level
    machine, versions = results["machine"], results["versions"]
    minutes = results["wall_seconds"] / 60.0
    budget = results.get("time_budget_seconds")
    within = f" (budget {budget / 60:.0f} min)" if budget else ""
    baselines = results.get("speed_baselines", {})
    missing = [k for k, v in baselines.items() if v is None]
    lines = [
        f"{h} bayesmeta benchmark: `{results['suite']}` suite",
        "",
        f"- command: `{results['command']}` (seed {results['seed']}, started "
        f"{results['started_utc']})",
        "- machine: "
        + (f"host {machine['host']}, " if machine.get("host") else "")
        + f"{machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs "
        f"({machine['usable_cpus']} usable), device {machine['device']}, "
        f"{machine['torch_threads']} torch threads",
        "- versions: " + ", ".join(f"{k} {versions[k]}" for k in _VERSION_ORDER if k in versions),
        f"- wall time: {minutes:.1f} min{within}; peak memory per row: "
        f"{results['memory_method']}; peak of the whole run (ru_maxrss): "
        f"{results['process_max_rss_mb']:.0f} MiB",
    ]
    resumed = results.get("resumed_rows") or []
    if resumed:
        # The wall time above then leaves out the earlier run's rows; say so, with their sum.
        row_minutes = sum(row["wall_seconds"] for row in results["rows"]) / 60.0
        lines.append(
            f"- resumed: {len(resumed)} of {len(results['rows'])} rows were read from an earlier "
            f"run's row files (`--resume`), so the wall time above is this invocation's alone; "
            f"the rows' own wall times sum to {row_minutes:.1f} min "
            f"({results.get('workers', 1)} rows at a time)"
        )
    if missing:
        lines.append(f"- not importable, so not timed: {', '.join(missing)}")
    lines += [f"- note: {note}" for note in results["suite_config"].get("notes", [])]
    lines += ["", render_tables(results)]
    return "\n".join(lines).rstrip() + "\n"


#: The summary's columns per kind: (header, condition ("" = headline), key, scale).
_SUMMARY = {
    "classification": [
        ("accuracy %", "", "accuracy", 100.0),
        ("NLL", "", "nll", 1.0),
        ("ECE", "", "ece", 1.0),
        ("within-alphabet %", "unseen_within_alphabet", "accuracy", 100.0),
    ],
    "regression": [
        ("MSE", "", "mse", 1.0),
        ("NLL", "", "nll", 1.0),
        ("90% coverage", "", "coverage_90", 1.0),
        ("CRPS", "", "crps", 1.0),
    ],
}


def render_summary(results: dict[str, Any]) -> str:
    """One small table per kind of task (regression, classification) in ``results``: each
    family's methods with their headline scores and their out-of-distribution AUROC by mutual
    information (for a README)."""
    rows = results["rows"]
    order = {m: i for i, m in enumerate(SUITE_METHODS)}
    families = list(dict.fromkeys(r["family"] for r in rows))
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = sorted(
            (r for r in rows if r["kind"] == kind),
            key=lambda r: (families.index(r["family"]), order.get(r["method"], len(order))),
        )
        columns = _SUMMARY[kind]
        header = ["family", "method", *(c[0] for c in columns), "OOD AUROC (MI)"]
        ooe = family_spec(group[0]["task"]).run.classes  # (out-of-episode needs classes)
        if ooe:
            header.append("OOE AUROC (best score)")
        body = []
        for row in group:
            cells = []
            for _, condition, key, scale in columns:
                scores = row["evaluations"].get(condition or row["headline"])
                value = None if scores is None else scores.get(key)
                cells.append("–" if value is None else _num(scale * value, 1 if scale > 1 else 3))
            mark = _TRANSDUCTIVE if _transductive(row) else ""
            ood = row["ood"].get("auroc_mutual_information")
            extra = [_ooe_best(row)] if ooe else []
            body.append([row["family"], row["method"] + mark, *cells, _num(ood), *extra])
        headlines = sorted({r["headline"].replace("_", " ") for r in group})
        out += [f"**{kind}** (headline scores: {', '.join(headlines)})", ""]
        out += [*_table(header, body), ""]
    return "\n".join(out).rstrip() + "\n"


def render_rows(rows: list[dict[str, Any]], heading_level: int = 1) -> str:
    """A Markdown report of the rows a run has finished so far (its ``OUT/rows/`` files), for a
    run that is still going or was killed before it wrote its results JSON.

    Only the rows' tables: the run's header (machine, versions, whole wall time) and its speed
    section exist once the run finishes. Rows are ordered by family, then by method as in the
    full report.
    """
    h = "#" * heading_level
    order = {m: i for i, m in enumerate(SUITE_METHODS)}  # the full report's order; others last
    kinds = list(_LEGENDS)  # (regression first)

    def place(r: dict[str, Any]) -> tuple:
        return kinds.index(r["kind"]), r["family"], order.get(r["method"], len(order))

    rows = sorted(rows, key=place)
    families = sorted({r["family"] for r in rows})
    lines = [
        f"{h} bayesmeta benchmark: the finished rows of an unfinished run",
        "",
        f"- {len(rows)} rows ({', '.join(families) or 'none'}), read from their row files; "
        "the run's header and speed section are written when it finishes",
        "",
        render_tables({"rows": rows, "speed": []}),
    ]
    return "\n".join(lines).rstrip() + "\n"


def splice_report(document: str, report: str, command: str, source: str) -> str:
    """``document`` with the generated block of ``source`` replaced by ``report``.

    A block runs from a line that starts with :data:`BLOCK_BEGIN` to the next line
    :data:`BLOCK_END`; a document may hold several, one per results file. The begin line names
    the block's source first (``<!-- bench:begin docs/results_quick.json -->`` is a block to
    fill); once written it also names ``command``. The block for ``source`` is the one whose
    begin line names it or, where none does, the one whose begin line names nothing. Both
    markers stay.

    Raises
    ------
    ValueError
        If the markers do not pair up (a begin line inside a block, an end line outside one,
        a block left open), or there is not exactly one block for ``source``.
    """
    lines = document.splitlines(keepends=True)
    blocks: list[tuple[int, int, str]] = []  # (begin line, end line, source named)
    begin = None
    for i, line in enumerate(lines):
        if line.startswith(BLOCK_BEGIN):
            if begin is not None:
                raise ValueError(f"line {i + 1}: a second '{BLOCK_BEGIN}' before '{BLOCK_END}'")
            begin = i
        elif line.rstrip("\n") == BLOCK_END:
            if begin is None:
                raise ValueError(f"line {i + 1}: '{BLOCK_END}' without a '{BLOCK_BEGIN}' line")
            blocks.append((begin, i, _block_source(lines[begin])))
            begin = None
    if begin is not None:
        raise ValueError(f"line {begin + 1}: '{BLOCK_BEGIN}' without a '{BLOCK_END}' line")
    chosen = [b for b in blocks if b[2] == source] or [b for b in blocks if not b[2]]
    if len(chosen) != 1:
        named = sorted({b[2] for b in blocks if b[2]})
        raise ValueError(
            f"expected one generated block for {source} (a line '{BLOCK_BEGIN} {source} -->', "
            f"later a line '{BLOCK_END}'), found {len(chosen)}; blocks for: "
            + (", ".join(named) or "none")
        )
    first, last, _ = chosen[0]
    marker = (
        f"{BLOCK_BEGIN} {source} generated by `{command}`; edit the results, not this block -->\n"
    )
    block = [marker, "\n", report.rstrip("\n") + "\n", "\n"]
    return "".join(lines[:first] + block + lines[last:])


def _block_source(begin_line: str) -> str:
    """The source a begin line names (``""`` for none)."""
    text = begin_line[len(BLOCK_BEGIN) :].strip().removesuffix("-->")
    return text.split(" generated by ", 1)[0].strip()
