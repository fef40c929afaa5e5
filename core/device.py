"""The one `--device` parser, shared by extract, train, eval and detect; the CPU cores a
process may use."""
from __future__ import annotations

import functools
import logging
import os

import torch

from vidpipe.core.errors import VidpipeError

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/'auto' -> cuda when present, else cpu; a one-line error for a bad or absent device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VidpipeError(f"device '{device}': not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VidpipeError(f"device '{device}': CUDA is not available on this machine")
    return resolved


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as torch counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows: no affinity masks
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)   # cached: the capping is said once per process
def loader_workers(requested: int, setting: str = "data.num_workers") -> int:
    """At most one DataLoader worker process per available core: more only wait for each
    other (torch warns of it on every loader). The paper configs ask for 4."""
    cores = available_cores()
    if requested <= cores:
        return requested
    log.info("%s=%d on %d available cores: %d loader workers", setting, requested, cores, cores)
    return cores
