"""Tensor and expert parallelism over torch.distributed (launch with torchrun).

``init_parallel(tp, ep, device)`` joins the group, ``load_parallel(path, state)`` reads this rank's
slices of a checkpoint, ``shard_model(model, state)`` cuts them from a model in memory. See
``tensor.py`` and ``expert.py`` for how the work is split and combined.
"""

from .dist import (
    DEFAULT_TIMEOUT_S,
    STEP_TIMEOUT_S,
    AllReduce,
    ParallelError,
    ParallelState,
    backend_for,
    broadcast_tokens,
    check_world,
    init_parallel,
    shutdown,
)
from .expert import LocalExperts
from .launch import ParallelRun, start_parallel
from .load import load_parallel
from .shard import check_parallel, configure, local_kv_heads, param_slices, shard_model

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STEP_TIMEOUT_S",
    "AllReduce",
    "LocalExperts",
    "ParallelError",
    "ParallelRun",
    "ParallelState",
    "backend_for",
    "broadcast_tokens",
    "check_parallel",
    "check_world",
    "configure",
    "init_parallel",
    "load_parallel",
    "local_kv_heads",
    "param_slices",
    "shard_model",
    "shutdown",
    "start_parallel",
]
