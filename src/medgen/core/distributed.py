"""Process-group setup for DDP: ``torchrun`` and SLURM (``srun``) environments.

NCCL on GPU, gloo on CPU. Rank 0 alone writes files. Per-rank decisions (stop signal,
non-finite loss) are shared with :func:`any_rank` so that no rank waits forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """The accelerator when there is one (CUDA), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; the default is one process on :func:`default_device`."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ and os.environ[n] != "":
            return int(os.environ[n])
    return default


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun (RANK/LOCAL_RANK/WORLD_SIZE) or SLURM variables."""
    if "WORLD_SIZE" in os.environ:
        return (_env_int("RANK", default=0), _env_int("LOCAL_RANK", default=0), _env_int("WORLD_SIZE", default=1))
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        return (_env_int("SLURM_PROCID", default=0), _env_int("SLURM_LOCALID", default=0),
                _env_int("SLURM_NTASKS", default=1))
    return 0, 0, 1


def setup_distributed(use_multi_gpu: bool = False, device: str | None = None) -> DistInfo:
    """Initialise the process group when launched with several processes; pick the device.

    ``use_multi_gpu`` only documents intent: the world size comes from the launcher. Launching
    several processes with ``use_multi_gpu=false`` is refused, since it is almost always a mistake.
    """
    rank, local_rank, world = env_world()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU")
        index = local_rank if world > 1 or dev.index is None else dev.index  # one GPU per rank under torchrun
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    if world > 1:
        if not use_multi_gpu:
            raise RuntimeError(
                f"launched with {world} processes but training.use_multi_gpu=false; "
                "set training.use_multi_gpu=true (or launch a single process)"
            )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo",
                rank=rank,
                world_size=world,
                timeout=timedelta(minutes=30),
            )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    if not info.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``flag`` (a bool scalar on this rank's device) AND-ed over all ranks, on the device: no rank's
    host waits for it (an all-reduce MIN)."""
    if not info.distributed:
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; a no-op in one process)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
