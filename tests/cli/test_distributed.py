"""``torchrun -m bayesmeta train / eval``: rank 0 writes, the shares add up to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bayesmeta.cli import main
from bayesmeta.inference import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # torchrun, 2 processes

ARGS = (
    "--task sinusoid --method maml --hidden 6 --meta-batch 5 --inner-steps 1 --shots 4 "
    "--queries 5 --val-every 0 --meta-steps 3 --checkpoint-every 2 --quiet"
).split()


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, "-m", "bayesmeta", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_trains_and_evaluates_as_one_process_does(tmp_path: Path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    done = _torchrun("train", *ARGS, "--out", str(two))
    assert done.stdout.count("trained sinusoid/maml to step 3") == 1  # rank 0 alone prints
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert main(["train", *ARGS, "--out", str(one)]) == 0
    a, b = (load_checkpoint(d / "learner.pt")["model"] for d in (two, one))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    _torchrun("eval", str(two), "--num-tasks", "9", "--meta-batch", "4")
    sharded = json.loads((two / "eval.json").read_text())
    assert main(["eval", str(two), "--num-tasks", "9", "--meta-batch", "4"]) == 0
    assert json.loads((two / "eval.json").read_text()) == sharded

    # Resumed from 2 processes on 1: the run goes on, and records its new world size.
    assert (
        main(["train", *ARGS[:-5], "--meta-steps", "4", "--out", str(two), "--resume", "--quiet"])
        == 0
    )
    assert json.loads((two / "config.json").read_text())["world_size"] == 1
    assert load_checkpoint(two / "checkpoint.pt")["step"] == 4
    capsys.readouterr()
