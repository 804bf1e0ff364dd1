"""``bayesmeta bench``: run a benchmark suite and write its JSON and Markdown table.

The suite itself lives in :mod:`bayesmeta.bench`; this module only parses arguments. It imports
:mod:`bayesmeta.bench.suite` when it runs, so that ``bayesmeta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from bayesmeta.bench.config import SUITE_METHODS, SUITES
from bayesmeta.bench.tasks import reads_data_root
from bayesmeta.cli._folders import (
    MARKER_NAME,
    FolderLock,
    holds_only_bookkeeping,
    make_folder,
    read_marker,
    record_files,
    remove_made_folder,
    write_marker,
)
from bayesmeta.inference import METHODS
from bayesmeta.runs import UsageError, check_device, resolve_data_root, write_text

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (accuracy, calibration, OOD gap, speed)",
        description="Meta-train and test every method on every task family of a suite, time "
        "the batched inner loop against a per-task loop, and write OUT/results.json and "
        "OUT/results.md (exit status 1 when a row failed: its error is in the JSON). Suites: "
        + "; ".join(f"{name}: {s.description}" for name, s in SUITES.items())
        + ".",
    )
    a = p.add_argument
    a("--suite", choices=list(SUITES), default="quick", help="which suite [quick]")
    a(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        metavar="METHOD",
        help=f"methods to compare, of {', '.join(sorted(METHODS))} [{' '.join(SUITE_METHODS)}]",
    )
    a("--out", metavar="DIR", help="output folder [bench_out/SUITE]")
    a(
        "--data-root",
        metavar="PATH",
        help="Omniglot folder [$BAYESMETA_DATA_ROOT, else the small background sets that ship "
        "with bayesmeta]; the full suite downloads torchvision's Omniglot into it (required "
        "there)",
    )
    a("--image-folder", metavar="PATH", help="also run 5-way 1/5-shot on a <class>/*.jpg tree")
    a("--seed", type=int, default=0, help="seed of training; test tasks use SEED+1000 [0]")
    a("--device", help="torch device, e.g. cuda [cpu]")
    a("--threads", type=int, metavar="N", help="torch.set_num_threads(N) [1 on a CPU]")
    a(
        "--workers",
        type=int,
        metavar="W",
        help="rows run at once, each in its own process [one per N usable CPUs on a CPU, "
        "1 on a GPU]",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows that an earlier run of the same configuration left in OUT/rows/",
    )
    mode.add_argument(
        "--force",
        action="store_true",
        help="overwrite the results of an earlier run in OUT (results.json, results.md, rows/)",
    )
    a("--no-speed", action="store_true", help="skip the speed section")
    a("--quiet", action="store_true", help="no progress lines on stderr")
    a(
        "--render",
        metavar="PATH",
        help="print the Markdown report of a saved results.json, or of the rows an unfinished "
        "run has written to DIR/rows/ when PATH is its output folder DIR, and exit (runs nothing)",
    )
    a(
        "--heading-level",
        type=int,
        default=1,
        metavar="H",
        help="with --render: the report's title is a level-H heading (3 under a README's '##') [1]",
    )
    a(
        "--summary",
        action="store_true",
        help="with --render: one small table per family (headline scores and OOD AUROC) "
        "instead of the full report",
    )
    a(
        "--into",
        metavar="FILE",
        help="with --render PATH: write the report into FILE's block for PATH, from a line "
        "'<!-- bench:begin PATH -->' to a line '<!-- bench:end -->' (a README's results "
        "section), instead of printing it",
    )
    p.set_defaults(func=run)


def _render(path: str, heading_level: int, into: str | None, summary: bool = False) -> int:
    from bayesmeta.bench.report import render_markdown, render_rows, render_summary
    from bayesmeta.bench.runner import ROWS_DIR, finished_rows
    from bayesmeta.bench.suite import JSON_NAME

    if not 1 <= heading_level <= 6:
        raise UsageError(f"--heading-level must be 1 to 6, got {heading_level}")
    folder = Path(path)
    if folder.is_dir() and (folder / JSON_NAME).is_file():
        folder = folder / JSON_NAME  # a finished run's folder: its results JSON
    try:
        if folder.is_dir():
            rows = finished_rows(folder)
            if not rows:
                raise UsageError(
                    f"--render: {path} is a folder with neither {JSON_NAME} nor row files in "
                    f"{ROWS_DIR}/; expected a results JSON or a bench output folder"
                )
            text = render_rows(rows, heading_level)
        elif summary:
            text = render_summary(json.loads(folder.read_text()))
        else:
            text = render_markdown(json.loads(folder.read_text()), heading_level)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--render: cannot read a results JSON from {path}: {err!r}") from err
    if into is None:
        print(text, end="")
    else:
        command = ["bayesmeta", "bench", "--render", path]
        command += ["--summary"] if summary else ["--heading-level", str(heading_level)]
        _splice_into(Path(into), text, shlex.join([*command, "--into", into]), path)
    return 0


def _splice_into(target: Path, report: str, command: str, source: str) -> None:
    """Replace ``target``'s generated block of ``source`` by ``report`` (atomically; nothing
    else changes)."""
    from bayesmeta.bench.report import splice_report

    try:
        document = target.read_text()
    except OSError as err:
        raise UsageError(f"--into: cannot read {target}: {err.strerror or err}") from err
    try:
        spliced = splice_report(document, report, command, source)
    except ValueError as err:
        raise UsageError(f"--into: {target}: {err}") from err
    write_text(target, spliced)
    print(f"wrote the report into {target}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (from the parsed arguments)."""
    words = ["bayesmeta", "bench", "--suite", args.suite]
    if args.methods:
        words += ["--methods", *args.methods]
    for flag in ("out", "data_root", "image_folder", "device", "threads", "workers"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    if args.seed:
        words += ["--seed", str(args.seed)]
    if args.no_speed:
        words.append("--no-speed")
    if args.resume:
        words.append("--resume")
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    if args.into and not args.render:
        raise UsageError("--into needs --render PATH (the results to write into it)")
    if args.summary and not args.render:
        raise UsageError("--summary needs --render PATH (the results to summarise)")
    if args.render:
        return _render(args.render, args.heading_level, args.into, args.summary)
    for flag in ("threads", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be a positive int, got {value}")
    if SUITES[args.suite].omniglot == "full":
        if not args.data_root:
            raise UsageError(
                f"the {args.suite} suite downloads torchvision's Omniglot; pass --data-root PATH "
                "(a writable folder, created if missing)"
            )
    elif reads_data_root(SUITES[args.suite].families):
        resolve_data_root(args.data_root)  # fail now, not after the first families have run
    check_device(args.device)
    out = Path(args.out or f"bench_out/{args.suite}")
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise UsageError(f"--image-folder {args.image_folder} is not a folder")
    made = make_folder(out, "bench output folder")
    try:
        with FolderLock(out, "bench output folder"):
            return _run_suite(args, out)
    finally:
        if made is not None and holds_only_bookkeeping(out):
            (out / MARKER_NAME).unlink(missing_ok=True)  # (refused before anything was written)
        remove_made_folder(out, made)


def _claim_outputs(args: argparse.Namespace, out: Path, names: tuple[str, ...]) -> None:
    """Refuse to overwrite an earlier run's ``names`` in ``out`` unless ``--force`` or
    ``--resume``, and any file there that bayesmeta did not write; then list ``names`` in the
    folder's marker, before the suite writes them."""
    earlier = [name for name in names if (out / name).exists()]
    if earlier and not (args.force or args.resume):
        raise UsageError(
            f"bench output folder {out} holds the results of an earlier run "
            f"({', '.join(earlier)}); pass --resume to reuse its finished rows, --force to "
            "overwrite them, or choose another --out"
        )
    marker = read_marker(out)
    foreign = [n for n in earlier if marker is None or n not in marker["files"]]
    if foreign:
        mode = "--force" if args.force else "--resume"
        raise UsageError(
            f"{mode}: bench output folder {out} holds {', '.join(foreign)}, which bayesmeta "
            f"bench did not write (the folder's {MARKER_NAME} does not list them); refusing "
            "to overwrite them: choose another --out, or move them away yourself"
        )
    if marker is None:
        write_marker(out, names)  # (listed before run_suite writes them)
    else:
        record_files(out, *names)


def _run_suite(args: argparse.Namespace, out: Path) -> int:
    from bayesmeta.bench import Execution
    from bayesmeta.bench.runner import ROWS_DIR
    from bayesmeta.bench.suite import JSON_NAME, MARKDOWN_NAME, run_suite

    _claim_outputs(args, out, (JSON_NAME, MARKDOWN_NAME, ROWS_DIR))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        suite = SUITES[args.suite]
        if args.image_folder is not None:
            suite = suite.with_image_folder(args.image_folder)
        if args.no_speed:
            suite = replace(suite, speed=None)
        execution = Execution(args.device, args.threads, args.workers, None if args.quiet else log)
        results = run_suite(
            suite,
            args.methods,
            out=out,
            data_root=args.data_root,
            seed=args.seed,
            execution=execution,
            resume=args.resume,
            command=_command(args),
        )
    except (ValueError, OSError) as err:  # OSError: e.g. a failed Omniglot download
        raise UsageError(str(err)) from err
    print(
        f"{args.suite} suite: {len(results['rows'])} rows, {len(results['speed'])} speed rows "
        f"in {results['wall_seconds'] / 60:.1f} min"
    )
    print(f"wrote {out / JSON_NAME} and {out / MARKDOWN_NAME}")
    failed = [f"{row['family']}/{row['method']}" for row in results["rows"] if row.get("error")]
    if failed:
        print(
            f"bayesmeta bench: {len(failed)} of {len(results['rows'])} rows failed "
            f"({', '.join(failed)}); their errors are in {out / JSON_NAME}",
            file=sys.stderr,
        )
        return 1
    return 0
