"""The one `--device` parser, shared by extract, train, eval and detect."""
from __future__ import annotations

import torch

from vidpipe.core.errors import VidpipeError


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
