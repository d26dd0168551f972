"""Distributed set-up of a training run: the torchrun / accelerate environment -> one process group.

`init_distributed` reads RANK, WORLD_SIZE, LOCAL_RANK, picks the device (cuda:LOCAL_RANK when a GPU
is visible, else the CPU) and starts the group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1.
`Dist` is what the trainer asks of it: rank, device, barriers and the two reductions it needs.
A single process is `Dist()` (rank 0 of 1 on the CPU): every collective is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fwmodel.train.config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def init_distributed(device_pref: str = "auto", deterministic: bool = False) -> Dist:
    """Read the torchrun / accelerate environment (RANK, WORLD_SIZE, LOCAL_RANK) and set up the group."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref not in ("auto", "cpu", "cuda") and not device_pref.startswith("cuda:"):
        raise ConfigError(f"model.device {device_pref!r}: use auto, cpu, cuda or cuda:N")
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device asks for CUDA but no GPU is visible (check CUDA_VISIBLE_DEVICES, `fwmodel doctor`)")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        allow_tf32(not deterministic)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, device)


def allow_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on GPUs: on for training unless train.deterministic (also `fwmodel bench`)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
