"""Data-parallel plumbing for `training.fit` under torchrun: process group, sharding, reductions.

    torchrun --nproc_per_node=2 -m training.fit --data digits --out runs/ddp

A single process (no torchrun, or WORLD_SIZE=1) gets a `DistContext` with world_size 1 and every
helper degenerates to the identity, so the single-process path is unchanged.

Sharding follows `torch.utils.data.DistributedSampler` (shuffle=True, drop_last=False), applied to
index tensors instead of a Dataset: every rank draws the same permutation of the training split from
`seed + epoch`, pads it by repeating its head to a multiple of world_size, and takes every
world_size-th index starting at its rank. With world_size 1 this is exactly the permutation.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str, timeout_s: float) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    NCCL for CUDA, gloo for CPU. `timeout_s` bounds every collective, so a rank that dies or stalls
    makes the others fail instead of hanging (torchrun then tears the job down with a non-zero exit).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d (local %d) joined the %s process group", rank, world_size, local_rank, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def epoch_shard(n: int, seed: int, epoch: int, ctx: DistContext) -> Tensor:
    """This rank's indices into the training split for `epoch`: (ceil(n / world_size),) int64."""
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)  # (n,), identical on every rank
    per_rank = -(-n // ctx.world_size)
    pad = per_rank * ctx.world_size - n
    if pad:
        perm = torch.cat([perm, perm[:pad]])  # DistributedSampler pads by wrapping around
    return perm[ctx.rank::ctx.world_size]


def contiguous_shard(n: int, ctx: DistContext) -> slice:
    """A contiguous, non-overlapping slice of n items for this rank (used for validation)."""
    per_rank = -(-n // ctx.world_size)
    return slice(min(n, ctx.rank * per_rank), min(n, (ctx.rank + 1) * per_rank))


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum a tensor over ranks (identity in a single process). Returns the reduced tensor."""
    if ctx.is_distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor, ctx: DistContext) -> Tensor:
    """The maximum of a tensor over ranks (identity in a single process)."""
    if ctx.is_distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
