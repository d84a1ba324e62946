"""Running under ``torchrun``: process groups, model wrapping and rank-aware helpers.

``torchrun --nproc_per_node=K ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without
them everything runs in one process. The backend is NCCL on CUDA and gloo on the CPU.
Multi-node runs use torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Distributed",
    "init_distributed",
    "unwrap",
    "wrap_model",
]


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over all ranks (a float64 CPU/device tensor)."""
        if self.enabled:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled between this job's own processes)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def init_distributed(device: str | None = None) -> Distributed:
    """Join the torchrun job if there is one; pick this rank's device (CUDA if available)."""
    wanted = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=wanted)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), wanted)


def wrap_model(model: nn.Module, strategy: str, env: Distributed) -> nn.Module:
    """``"none"``, ``"ddp"`` (DistributedDataParallel) or ``"fsdp"`` (FSDP2 ``fully_shard``).

    FSDP shards every module that has a ``conditioner`` attribute's conditioner (the unit a
    coupling calls in both directions, so ``inverse`` and sampling work too), then the root.
    """
    if strategy == "none" or not env.enabled:
        return model
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(getattr(module, "conditioner", None), nn.Module):
                fully_shard(module.conditioner)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}; expected none, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper or ``torch.compile`` (FSDP2 shards in place)."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model
