"""TaskBatch validation, device moves and indexing; the TaskDistribution protocol."""

from __future__ import annotations

import pytest
import torch

from bayesmeta.data import TaskBatch, TaskDistribution


def regression(T=3, S=4, Q=5, D=1):
    return dict(
        support_x=torch.randn(T, S, 2),
        support_y=torch.randn(T, S, D),
        query_x=torch.randn(T, Q, 2),
        query_y=torch.randn(T, Q, D),
    )


def classification(T=3, N=2, K=2, Q=3):
    return dict(
        support_x=torch.rand(T, N * K, 1, 4, 4),
        support_y=torch.arange(N).repeat_interleave(K).repeat(T, 1),
        query_x=torch.rand(T, N * Q, 1, 4, 4),
        query_y=torch.arange(N).repeat_interleave(Q).repeat(T, 1),
        num_classes=N,
    )


def test_valid_batches():
    r = TaskBatch(**regression())
    assert r.num_tasks == 3 and not r.is_classification
    c = TaskBatch(**classification())
    assert c.num_tasks == 3 and c.is_classification and c.num_classes == 2
    # Labels without num_classes only need to be >= 0.
    TaskBatch(**{**classification(), "num_classes": None})


@pytest.mark.parametrize("name", ["support_x", "support_y", "query_x", "query_y"])
def test_non_tensor_is_type_error(name):
    with pytest.raises(TypeError, match=name):
        TaskBatch(**{**regression(), name: [[1.0]]})


NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"support_x": torch.randn(3)}, r"support_x must have shape \[T, B, \.\.\.\]"),
        ({"query_x": torch.randn(3)}, r"query_x must have shape \[T, B, \.\.\.\]"),
        ({"support_x": torch.ones(3, 4, 2, dtype=torch.int64)}, "support_x must be floating"),
        ({"query_x": torch.ones(3, 5, 2, dtype=torch.int64)}, "query_x must be floating"),
        ({"support_x": torch.full((3, 4, 2), NAN)}, "support_x must be finite"),
        ({"query_x": torch.full((3, 5, 2), INF)}, "query_x must be finite"),
        ({"support_y": torch.randn(2, 4, 1)}, "support_y must have the same number of tasks"),
        ({"query_x": torch.randn(2, 5, 2)}, "query_x must have the same number of tasks"),
        ({"query_y": torch.randn(2, 5, 1)}, "query_y must have the same number of tasks"),
        ({"query_y": torch.tensor(1.0)}, "query_y must have the same number of tasks"),
        ({"query_x": torch.randn(3, 5, 3)}, "support_x and query_x must share their input shape"),
        ({"support_y": torch.randn(3, 3, 1)}, r"support_y must have shape \[T, 4, \.\.\.\]"),
        ({"query_y": torch.randn(3, 6, 1)}, r"query_y must have shape \[T, 5, \.\.\.\]"),
        ({"query_y": torch.randn(3)}, r"query_y must have shape \[T, 5, \.\.\.\]"),
        ({"query_y": torch.zeros(3, 5, dtype=torch.int64)}, "must be of the same kind"),
        ({"num_classes": 2}, "num_classes is only for integer class labels"),
        ({"support_y": torch.full((3, 4, 1), NAN)}, "support_y must be finite"),
        ({"query_y": torch.full((3, 5, 1), INF)}, "query_y must be finite"),
    ],
)
def test_regression_validation(change, match):
    with pytest.raises(ValueError, match=match):
        TaskBatch(**{**regression(), **change})


@pytest.mark.parametrize(
    "T, S, Q, match",
    [
        (0, 4, 5, "at least one task"),
        (3, 0, 5, "support set must be non-empty"),
        (3, 4, 0, "query set must be non-empty"),
    ],
)
def test_empty_axes(T, S, Q, match):
    with pytest.raises(ValueError, match=match):
        TaskBatch(**regression(T, S, Q))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"support_y": torch.zeros(3, 4, 1, dtype=torch.int64)}, r"support_y class labels"),
        ({"query_y": torch.zeros(3, 6, 1, dtype=torch.int64)}, r"query_y class labels"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"support_y": torch.full((3, 4), -1)}, r"support_y labels must lie in \[0, 2\)"),
        ({"query_y": torch.full((3, 6), 2)}, r"query_y labels must lie in \[0, 2\)"),
    ],
)
def test_classification_validation(change, match):
    with pytest.raises(ValueError, match=match):
        TaskBatch(**{**classification(), **change})


def test_negative_labels_without_num_classes():
    bad = {**classification(), "num_classes": None, "query_y": torch.full((3, 6), -2)}
    with pytest.raises(ValueError, match=r"query_y labels must lie in \[0, inf\)"):
        TaskBatch(**bad)


def test_to_moves_every_tensor_and_keeps_values():
    batch = TaskBatch(**classification())
    moved = batch.to("cpu")
    assert moved is not batch and moved.num_classes == 2
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
        assert getattr(moved, name).device == torch.device("cpu")
    if torch.cuda.is_available():
        on_gpu = batch.to("cuda")
        assert all(getattr(on_gpu, n).is_cuda for n in ("support_x", "support_y", "query_y"))


@pytest.mark.parametrize(
    "index, rows",
    [
        (0, [0]),
        (2, [2]),
        (-1, [3]),
        (-2, [2]),
        (slice(1, 3), [1, 2]),
        (torch.tensor([3, 0]), [3, 0]),
        (torch.tensor([True, False, True, False]), [0, 2]),
    ],
)
def test_indexing_keeps_a_task_axis(index, rows):
    batch = TaskBatch(**classification(T=4))
    sub = batch[index]
    assert sub.num_tasks == len(rows) and sub.num_classes == 2
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[rows])


@pytest.mark.parametrize("index", [4, -5])
def test_index_out_of_range(index):
    with pytest.raises(IndexError, match="out of range"):
        TaskBatch(**regression(T=4))[index]


def test_frozen():
    batch = TaskBatch(**regression())
    with pytest.raises(AttributeError):
        batch.num_classes = 3  # type: ignore[misc]


def test_protocol_is_runtime_checkable():
    class Fixed:
        def sample(self, num_tasks, generator=None):
            return TaskBatch(**regression(T=num_tasks))

    assert isinstance(Fixed(), TaskDistribution)
    assert not isinstance(object(), TaskDistribution)
