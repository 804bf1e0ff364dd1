"""The ``bayesmeta`` command line: ``train``, ``eval``, ``diagnose`` and ``bench``.

Each subcommand is a module with ``add_parser(subparsers)`` (which sets ``func``) and
``run(args) -> int``; :data:`SUBCOMMANDS` lists them in order. User errors are raised as
:class:`UsageError` and reported as one line on stderr with exit status 2 (argparse's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import bayesmeta
from bayesmeta.cli import bench, diagnose, evaluate, train
from bayesmeta.runs import UsageError

__all__ = ["main", "build_parser", "UsageError", "SUBCOMMANDS"]

SUBCOMMANDS = (train, evaluate, diagnose, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesmeta",
        description="Bayesian meta-learning on Pyro and PyTorch.",
        epilog="Run 'bayesmeta COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=bayesmeta.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or an argparse error (already printed)
        return int(exit_.code or 0)
    try:
        _set_threads(args)
        return args.func(args)
    except UsageError as err:
        message = " ".join(str(err).split())  # one line, whatever the cause said
        print(f"bayesmeta {args.command}: error: {message}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"bayesmeta {args.command}: interrupted", file=sys.stderr)
        return 130


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads N`` of train, eval and diagnose (bench passes its own to its workers)."""
    threads = getattr(args, "threads", None)
    if threads is None or args.command == "bench":
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive int, got {threads}")
    torch.set_num_threads(threads)
