"""Meta-training over torch.distributed (gloo, CPU processes) against one process.

N processes must give θ of one process on the whole meta-batch: for methods without random
draws whatever the chunks, and for those with draws (bayes's posterior samples, Reptile's
mini-batches) when the one process's chunks begin where the ranks' shares do.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
import torch.multiprocessing as mp

from bayesmeta.inference import evaluate
from bayesmeta.inference.distributed import chunk_generator, shard, world
from tests.inference import _distributed_worker as worker

STEPS = 3


def _single(method: str, T: int, chunk: int | None):
    lrn = worker.learner(method, task_chunk=chunk)
    lrn.fit(worker.Lines(), meta_steps=STEPS, meta_batch=T, seed=5, progress=False)
    return lrn


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("size, T", [(2, 5), (3, 6)])
def test_processes_reach_the_theta_of_one_process(tmp_path, size, T):
    mp.spawn(
        worker.train,
        args=(size, str(tmp_path / "rdv"), str(tmp_path), list(worker.METHODS), T, STEPS),
        nprocs=size,
        join=True,
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    first_share = shard(T, 0, size)[1]
    for method in worker.METHODS:
        random = method in ("bayes", "reptile")
        # One process whose chunks begin at the shares' first tasks (2 ranks, 5 tasks: 0-2 and
        # 3-4; 3 ranks, 6 tasks: 0-1, 2-3, 4-5); without draws, the whole batch at once.
        lrn = _single(method, T, first_share if random else None)
        got = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        want = worker.theta(lrn)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-9), (method, name)
        moved = worker.theta(worker.learner(method))
        assert any(not torch.equal(moved[n], want[n]) for n in want), method  # θ did move
        # Evaluation, sharded by batches (4 of 2, 2, 2, 1 tasks), scores as one process does.
        alone = evaluate(lrn, worker.Lines(), num_tasks=7, meta_batch=2, seed=1)
        assert scores[method].keys() == alone.keys()
        for key, value in alone.items():
            assert scores[method][key] == pytest.approx(value, rel=1e-7, abs=1e-9), (method, key)


def test_chunks_that_begin_apart_draw_apart():
    # The reference above is not vacuous: bayes with other chunks draws other numbers.
    a, b = _single("bayes", 6, 2), _single("bayes", 6, 3)
    ta, tb = worker.theta(a), worker.theta(b)
    assert any(not torch.allclose(ta[n], tb[n], rtol=1e-9, atol=1e-9) for n in ta)
    assert not torch.equal(torch.rand(3, generator=chunk_generator(7, 0)),
                           torch.rand(3, generator=chunk_generator(7, 1)))  # fmt: skip


def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one():
    for n in range(1, 12):
        for size in range(1, n + 1):
            parts = [shard(n, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = [stop - start for start, stop in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert world() == (0, 1)  # no process group here


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("how, timeout_s", [("die", 20), ("hang", 5)])
def test_a_dead_or_silent_rank_makes_the_others_fail_within_the_timeout(tmp_path, how, timeout_s):
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=worker.stop_at_step_2,
            args=(rank, 2, str(tmp_path / "rdv"), str(tmp_path), timeout_s, how),
        )
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    procs[0].join(timeout=120)  # (the processes' start-up counts too)
    hung = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not hung, f"rank 0 still waited after its peer {'died' if how == 'die' else 'hung'}"
    assert procs[0].exitcode not in (0, None)
    if how == "die":
        assert procs[1].exitcode == 3
    waited, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert message.startswith("RankFailure: rank 0 of 2:"), message
    assert float(waited) < timeout_s + 5  # from its peer's stop to its own error
