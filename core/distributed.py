"""The one reader of torchrun's environment, shared by `vidpipe extract` and `vidpipe train`.

torchrun (and other launchers) start each process with RANK, WORLD_SIZE and LOCAL_RANK set;
without them vidpipe runs as one process. A process's GPU is `cuda:LOCAL_RANK` (modulo the
GPUs present) unless the user named one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vidpipe.core.device import resolve_device
from vidpipe.core.errors import VidpipeError


@dataclass(frozen=True)
class ProcessGroupEnv:
    rank: int = 0          # this process among all (RANK)
    world_size: int = 1    # number of processes (WORLD_SIZE)
    local_rank: int = 0    # this process on its machine (LOCAL_RANK): picks its GPU


def distributed_env(rank: int | None = None, world_size: int | None = None) -> ProcessGroupEnv:
    """This process's place among the launcher's processes; `rank` / `world_size` given by
    the caller win over the environment. A value that is not a whole number, or a rank
    outside the world, is a one-line error."""
    def read(name: str, default: int) -> int:
        text = os.environ.get(name, str(default))
        try:
            return int(text)
        except ValueError:
            raise VidpipeError(f"environment variable {name}={text!r}: expected a whole number") from None

    rank = read("RANK", 0) if rank is None else rank
    world_size = read("WORLD_SIZE", 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise VidpipeError(f"rank {rank} is outside world size {world_size}")
    return ProcessGroupEnv(rank, world_size, read("LOCAL_RANK", 0))


def process_device(device: str | torch.device | None, env: ProcessGroupEnv) -> torch.device:
    """The device of this process: `device` as resolved by core.device; a CUDA device without
    an index (None or 'cuda' on a GPU machine) becomes this process's GPU, cuda:LOCAL_RANK."""
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
    return target
