"""Checkpoints: one `.pt` file holding everything needed to use or continue a model.

Contents (plain types and tensors only, so `torch.load(path, weights_only=True)` reads it):
model_state, config (the full Config as a dict), feature_settings (the manifest settings of
the cache it was trained on: a model only fits features made the same way), class_names,
epoch (epochs completed), step (optimizer steps), optimizer and AMP scaler state, rng (torch
RNG states of every process, for exact resume), history (one metrics dict per epoch), best
(the best selection score so far). The learning-rate schedule is a pure function of the
epoch progress (malt.train.lr_factor), so `epoch` is its whole state.
"""
from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidpipe.malt.config import Config, saved_config
from vidpipe.malt.model import MALT
from vidpipe.core.atomic import atomic_path
from vidpipe.core.device import resolve_device
from vidpipe.core.errors import VidpipeError, first_line


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    config: dict
    feature_settings: dict
    class_names: list[str]
    epoch: int = 0
    step: int = 0
    optimizer: dict | None = None
    scaler: dict | None = None
    rng: dict | None = None
    history: list[dict] = field(default_factory=list)
    best: float | None = None

    def model_config(self, source: str = "checkpoint") -> Config:
        return saved_config(self.config, source)


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Atomic write (core.atomic): a kill never leaves a corrupt checkpoint."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(asdict(checkpoint), tmp)


def read_checkpoint(path: str | Path, device: str | torch.device | None = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise VidpipeError(f"{path}: checkpoint not found")
    device = resolve_device(device)  # a bad --device is the user's mistake, not the file's
    try:
        data: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
        return Checkpoint(**data)
    except pickle.UnpicklingError:  # torch's own text here suggests weights_only=False: not for us
        raise VidpipeError(f"{path}: not a vidpipe checkpoint (not a torch file, or one holding "
                           f"more than tensors and plain types)") from None
    except (TypeError, RuntimeError, EOFError, OSError) as exc:
        raise VidpipeError(f"{path}: not a vidpipe checkpoint ({first_line(exc)})") from None


def load_model(path: str | Path, device: str | torch.device | None = "cpu") -> tuple[MALT, Checkpoint]:
    """The trained model (in eval mode, on `device`; None: cuda when present) and its checkpoint."""
    checkpoint = read_checkpoint(path, device)
    model = MALT(checkpoint.model_config(str(path)).model)
    model.load_state_dict(checkpoint.model_state)
    return model.to(resolve_device(device)).eval(), checkpoint
