"""All-gather that carries gradients, for contrastive losses over the global batch.

`torch.distributed.nn.functional.all_gather` sums the gradients of every rank's copy back onto the owner
(reduce-scatter), so with each rank's loss a mean over its own rows and the usual data-parallel gradient
averaging, the gradient is exactly that of the mean loss over the global batch. (X-VLM's own AllGather returns
only the local slice of the gradient, which scales the contrastive term by 1/world size.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0 ([world * B, ...]); gradients flow back."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` [B, ...] (any dtype, no gradient) from every rank along dim 0 ([world * B, ...])."""
    _, world = rank_and_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
