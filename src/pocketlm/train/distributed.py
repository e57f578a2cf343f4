"""More than one process: torch.distributed as `torchrun` sets it up, nothing home-made.

Under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR... in the environment) `setup` joins the
process group (NCCL on GPUs, gloo on CPU) and the trainer wraps the model in
DistributedDataParallel, or FSDP2's `fully_shard` for models that do not fit one device.
Without torchrun everything here is a no-op for a world of one. Knows nothing of data or
files.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> World:
    """Join torchrun's process group when there is one; the world this process is in."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def device_for(world: World, device: str) -> str:
    """Each process on a GPU of its own."""
    return f"cuda:{world.local_rank}" if device == "cuda" and world.size > 1 else device


def wrap(model: nn.Module, world: World, *, fsdp: bool, blocks: list[nn.Module]) -> nn.Module:
    """The model as the training step calls it: DDP or FSDP in a world of many."""
    if world.size <= 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sum_all(value: float, world: World, *, device: torch.device) -> float:
    """`value` summed over all processes."""
    if world.size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def any_of(flags: list[bool], world: World, *, device: torch.device) -> list[bool]:
    """Each flag OR-ed over all processes (one small all-reduce)."""
    if world.size <= 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather_objects(obj: object, world: World) -> list:
    """Every process's `obj`, in rank order (collective: all ranks must call it)."""
    if world.size <= 1:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
