"""The command line under ``torchrun``: the timeout option, and rank 0 telling the others
whether it set the run folder up (rank 0 alone checks, writes and prints)."""

from __future__ import annotations

import argparse
from typing import Any

from bayesmeta.inference.distributed import DEFAULT_TIMEOUT_S, share_from_rank0, world

__all__ = ["add_dist_timeout", "Followers"]


def add_dist_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="under torchrun: seconds a process waits for the others before the run fails "
        f"(default {DEFAULT_TIMEOUT_S:g})",
    )


class Followers:
    """Rank 0's one message to the other ranks: ``{"config": ...}`` to go on with, or
    ``{"code": n}`` to stop with exit status ``n`` (rank 0 printed why). A single process
    has no followers: :meth:`tell` does nothing."""

    def __init__(self) -> None:
        self.told = world()[1] == 1

    def tell(self, message: dict[str, Any]) -> None:
        if not self.told:
            self.told = True
            share_from_rank0(message)

    @staticmethod
    def listen() -> dict[str, Any]:
        """On a rank other than 0: rank 0's message."""
        return share_from_rank0(None)  # type: ignore[return-value]
