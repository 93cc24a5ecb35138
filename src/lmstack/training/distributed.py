"""Distributed training on an existing engine: torch.distributed with DDP or FSDP2 (`fully_shard`).

Launch with torchrun; single- and multi-node both go through its rendezvous flags:

    torchrun --nproc_per_node=2 -m lmstack pretrain --strategy fsdp ...                 # one machine
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=JOB -m lmstack pretrain --strategy fsdp ...

FSDP2 shards parameters, gradients and optimizer state across ranks (ZeRO-3). Checkpoints are gathered into
one full state dict on rank 0, so an FSDP checkpoint loads in a single process and vice versa.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import LmstackError

STRATEGIES = ("single", "ddp", "fsdp")


def init(strategy: str) -> torch.device:
    """Join the process group torchrun set up; returns this rank's device."""
    if strategy not in STRATEGIES:
        raise LmstackError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cuda = torch.cuda.is_available()
    if strategy == "single":
        return torch.device("cuda" if cuda else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LmstackError(f"--strategy {strategy} needs torchrun: torchrun --nproc_per_node=N -m lmstack pretrain ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def wrap(model: nn.Module, strategy: str) -> nn.Module:
    """DDP replicates the model; FSDP2 shards every transformer layer and then the root module."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for module in model.modules():
            if hasattr(module, "attn") and hasattr(module, "mlp"):  # a Block
                fully_shard(module)
        fully_shard(model)
    return model


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
