"""The one place where method statistics are reduced across ranks.

Statistics a method learns during training (ECM's fg/bg RoI counts, ...) must be identical on every
rank: detectron2 wraps DDP with ``broadcast_buffers=False``, so nothing syncs buffers for us. Each
update therefore uses sums over all ranks, computed here, and every rank applies the same update.
"""
import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["all_reduce_sum"]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (returns a new tensor; the input is left as it is).

    Every rank must call this at the same point, which holds for code on the training forward
    path: all ranks run it once per iteration, empty batches included.
    """
    total = tensor.detach().clone()
    if comm.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
