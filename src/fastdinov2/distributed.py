"""Everything fastdinov2 does with ``torch.distributed`` lives here.

Model and loss code import only the guarded helpers below (:func:`all_reduce_sum`, :func:`get_rank`,
:func:`get_world_size`), which are no-ops in a single process, so every loss runs unchanged on one CPU
process. Process-group set-up and DDP/FSDP2 wrapping are applied from outside the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (identity in a single process); returns it."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over all ranks, in place (identity in a single process)."""
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
