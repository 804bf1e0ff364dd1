"""The ``bayesmeta`` command line: ``train``, ``eval``, ``diagnose`` and ``bench``.

Each subcommand is a module with ``add_parser(subparsers)`` (which sets ``func``) and
``run(args) -> int``; :data:`SUBCOMMANDS` lists them in order. User errors are raised as
:class:`UsageError` and reported as one line on stderr with exit status 2 (argparse's); a full
disk (or quota, or file size limit) is one line with exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

import torch

import bayesmeta
from bayesmeta.cli import bench, diagnose, evaluate, train
from bayesmeta.inference.distributed import RankFailure, init_from_environment
from bayesmeta.nets.threads import busy_cores, usable_cores
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
    joined = False
    try:
        _set_threads(args)
        joined = _join_processes(args)
        return args.func(args)
    except UsageError as err:
        message = " ".join(str(err).split())  # one line, whatever the cause said
        print(f"bayesmeta {args.command}: error: {message}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"bayesmeta {args.command}: interrupted", file=sys.stderr)
        return 130
    except RankFailure as err:
        print(f"bayesmeta {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in _FULL:
            raise
        print(f"bayesmeta {args.command}: error: {_full_disk(args.command, err)}", file=sys.stderr)
        return 1
    finally:
        if joined:
            torch.distributed.destroy_process_group()


#: The errors of a full disk, a full quota and a file over the size limit (RLIMIT_FSIZE).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _full_disk(command: str, err: OSError) -> str:
    """One line for a write that ran out of room. Every file is written atomically, so each
    one written before is whole, and the one being written is left as it was."""
    what = f"cannot write {err.filename}" if err.filename else "a write failed"
    again = (
        "free some space, then continue the run with --resume"
        if command == "train"
        else "free some space and run it again"
    )
    return (
        f"{what}: {err.strerror or err} (the disk, a quota or the file size limit is full); "
        f"nothing was half written (each file is replaced whole or not at all): {again}"
    )


def _join_processes(args: argparse.Namespace) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join its process group: train and eval shard
    their tasks over it; the other commands run on one process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    if args.command not in ("train", "eval"):
        raise UsageError(
            f"{args.command} runs in one process, but WORLD_SIZE={size}: launch only train and "
            "eval with torchrun (benchmarks/bench_distributed.py measures the scaling)"
        )
    timeout = args.dist_timeout
    if not timeout > 0:
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    return init_from_environment(timeout)


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads N`` of train, eval and diagnose (bench passes its own to its workers).
    Without it, torch's setting less the cores other processes keep busy at the start
    (:func:`bayesmeta.nets.threads.busy_cores`): threads that share work with a descheduled
    peer spin while they wait for it."""
    if args.command == "bench" or not hasattr(args, "threads"):
        return
    threads = args.threads
    if threads is None:
        busy = busy_cores()
        if busy:
            free = max(1, usable_cores() - busy)
            torch.set_num_threads(min(torch.get_num_threads(), free))
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive int, got {threads}")
    torch.set_num_threads(threads)
