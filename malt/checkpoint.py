"""Checkpoints: one `.pt` file holding everything needed to use or continue a model.

Contents (plain types and tensors only, so `torch.load(path, weights_only=True)` reads it):
model_state, config (the full Config as a dict), feature_settings (the manifest settings of
the cache it was trained on: a model only fits features made the same way), class_names,
epoch (epochs completed), step (optimizer steps), optimizer and AMP scaler state, rng (torch
RNG states of every process, for exact resume), history (one metrics dict per epoch), best
(the best selection score so far). The learning rate is a pure function of the optimiser
step and the config (malt.train.learning_rate), so `step` is its whole state.

Integrity: the file also holds `tensors_sha256`, a hash of every tensor it stores (name,
dtype, shape, bytes), verified on every read: damaged weights are a one-line error, never a
model that silently predicts wrong. Every other failure to read a file (not a torch file,
truncated, a bare or timm-style `state_dict`, weights of another shape) is a one-line error
naming the file and what it is. Saving removes the temporaries of killed writers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidpipe.malt.config import Config, saved_config
from vidpipe.malt.model import MALT
from vidpipe.core.atomic import atomic_path, remove_stale_temporaries
from vidpipe.core.device import resolve_device
from vidpipe.core.errors import VidpipeError, first_line
from vidpipe.core.paths import require_checkpoint_file

__all__ = ["Checkpoint", "INTEGRITY_KEY", "load_model", "read_checkpoint", "save_checkpoint",
           "tensors_digest"]


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


INTEGRITY_KEY = "tensors_sha256"
_REQUIRED = {"model_state": dict, "config": dict, "feature_settings": dict, "class_names": list}


def tensors_digest(value: Any) -> str:
    """sha256 over every tensor in a nested dict/list (path, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    _hash_tensors(value, digest, "")
    return f"sha256:{digest.hexdigest()}"


def _hash_tensors(value: Any, digest: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{where}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _hash_tensors(value[key], digest, f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _hash_tensors(item, digest, f"{where}/{index}")


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Atomic write (core.atomic): a kill never leaves a corrupt checkpoint; the temporaries
    of writers killed earlier are removed first."""
    remove_stale_temporaries(Path(path).parent)
    data = asdict(checkpoint)
    data[INTEGRITY_KEY] = tensors_digest(data)
    # Serialised in memory, then written in one go: torch's own writer words a full disk as
    # "iostream error" / "enforce fail at inline_container.cc"; Python's says ENOSPC (DiskFull).
    image = io.BytesIO()
    torch.save(data, image)
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as file:
        file.write(image.getbuffer())


def read_checkpoint(path: str | Path, device: str | torch.device | None = "cpu") -> Checkpoint:
    path = require_checkpoint_file(path)
    device = resolve_device(device)  # a bad --device is the user's mistake, not the file's
    try:
        with warnings.catch_warnings():   # junk files make torch warn, then fail: one line
            warnings.simplefilter("ignore")
            data: Any = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's own text here suggests weights_only=False: not for us
        raise VidpipeError(f"{path}: not a vidpipe checkpoint (not a torch file, or one holding "
                           f"more than tensors and plain types)") from None
    except Exception as exc:  # a damaged file fails in many ways (KeyError, struct.error, ...)
        raise VidpipeError(f"{path}: not a readable torch file, or a damaged one "
                           f"({type(exc).__name__}: {first_line(exc)})") from None
    return _checkpoint_from(data, path)


def _checkpoint_from(data: Any, path: Path) -> Checkpoint:
    """Check what the file holds, then its tensors against the stored hash."""
    if not isinstance(data, dict) or "model_state" not in data:
        raise VidpipeError(f"{path}: not a vidpipe checkpoint: {_describe(data)}; vidpipe "
                           "checkpoints are written by `vidpipe train` (runs/NAME/best.pt)")
    known = {f.name for f in dataclasses.fields(Checkpoint)} | {INTEGRITY_KEY}
    problems = [f"'{key}' missing or not a {kind.__name__}" for key, kind in _REQUIRED.items()
                if not isinstance(data.get(key), kind)]
    problems += [f"unknown key '{key}'" for key in sorted(map(str, set(data) - known))]
    if problems:
        raise VidpipeError(f"{path}: not a vidpipe checkpoint ({'; '.join(problems)})")
    stored = data.pop(INTEGRITY_KEY, None)
    if stored is None:
        raise VidpipeError(f"{path}: checkpoint has no integrity hash (written by an older "
                           "vidpipe); train again")
    if tensors_digest(data) != stored:
        raise VidpipeError(f"{path}: damaged checkpoint: its tensors do not match the hash "
                           "stored with them; use another checkpoint or train again")
    checkpoint = Checkpoint(**data)
    _check_sizes(checkpoint, path)
    return checkpoint


def _check_sizes(checkpoint: Checkpoint, path: Path) -> None:
    """The sizes its config declares against its class names and stored tensors, before
    anything is allocated: the model is built on the meta device (shapes, no memory), so a
    config declaring d_model 2^20 over small tensors is a line, not terabytes asked for."""
    config = checkpoint.model_config(str(path)).model
    inconsistent = f"{path}: damaged or inconsistent checkpoint:"
    if config.num_classes != len(checkpoint.class_names):
        raise VidpipeError(f"{inconsistent} its config declares {config.num_classes} classes "
                           f"(background included) but it names {len(checkpoint.class_names)}; "
                           "use another checkpoint or train again")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in MALT(config).state_dict().items()}
    stored = {name: tuple(getattr(t, "shape", ())) for name, t in checkpoint.model_state.items()}
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    misfit = [f"size mismatch for {name}: the file holds {list(stored[name])}, its config "
              f"describes {list(shape)}" for name, shape in expected.items()
              if name in stored and stored[name] != shape]
    problems = misfit + [f"missing weight {name}" for name in missing] + \
        [f"unexpected weight {name}" for name in unexpected]
    if problems:
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        raise VidpipeError(f"{inconsistent} the weights do not fit the model its config "
                           f"describes ({problems[0]}{more})")


def _describe(data: Any) -> str:
    """What a foreign torch file holds, in a few words."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}"
    if "state_dict" in data:
        return ("it holds a model's weights as {'state_dict': ...} (timm/Lightning style), "
                "without the config, feature settings and class names MALT needs")
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return f"it is a bare state_dict ({len(data)} weight tensors) without a config"
    return f"it holds a dict with keys {', '.join(sorted(map(str, data))[:6])}"


def load_model(path: str | Path, device: str | torch.device | None = "cpu") -> tuple[MALT, Checkpoint]:
    """The trained model (in eval mode, on `device`; None: cuda when present) and its checkpoint."""
    checkpoint = read_checkpoint(path, device)
    model = MALT(checkpoint.model_config(str(path)).model)
    try:
        model.load_state_dict(checkpoint.model_state)
    # Shapes were checked (_check_sizes); a tensor of the right shape that cannot be copied
    # into a float weight (a quantized one) still fails here. Torch's first line is a
    # heading; the second says what.
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise VidpipeError(f"{path}: the weights do not fit the model its config describes "
                           f"({lines[1] if len(lines) > 1 else first_line(exc)})") from None
    return model.to(resolve_device(device)).eval(), checkpoint
