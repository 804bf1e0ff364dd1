"""Backbones and their task-batched functional forward (no Pyro here)."""

from bayesmeta.nets.backbone import BACKBONES, Backbone, register_backbone
from bayesmeta.nets.conv4 import Conv4
from bayesmeta.nets.functional import (
    LINEAR_HEAD,
    batched_features,
    batched_forward,
    has_linear_head,
    head_parameter_names,
    linear_head,
    local_forward,
    preferred_task_chunk,
    takes_context,
)
from bayesmeta.nets.memory import keep_freed_memory
from bayesmeta.nets.mlp import MLP
from bayesmeta.nets.threads import intra_op_threads, threads_for

__all__ = [
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
