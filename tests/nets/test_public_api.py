"""The public API of bayesmeta.nets (its imports are checked by tests/test_layering.py)."""

import bayesmeta.nets


def test_public_api():
    assert bayesmeta.nets.__all__ == [
        "Backbone",
        "BACKBONES",
        "register_backbone",
        "MLP",
        "Conv4",
        "batched_forward",
        "batched_features",
        "linear_head",
        "local_forward",
        "LINEAR_HEAD",
        "has_linear_head",
        "takes_context",
        "head_parameter_names",
        "preferred_task_chunk",
        "keep_freed_memory",
        "threads_for",
        "intra_op_threads",
    ]
