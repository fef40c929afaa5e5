"""Backbone weights: hub names, local files or a seeded random initialisation.

Every network the extractor runs (RGB CNN, flow CNN, RAFT) comes from here with an
*identity* string that the cache records: the hub weights' name, the file's sha256, or
'random-init seed N'. Offline, a pretrained request fails at once with one line that says
how to pass a file or choose random init (instead of the hub's minute of retries).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from vidpipe.core.errors import VidpipeError, first_line


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(random_init: bool, seed: int, weights_file: str | None, hub_name: str) -> str:
    """What the cache records about where a network's weights came from."""
    if random_init:
        return f"random-init seed {seed}"
    if weights_file:
        return f"file {Path(weights_file).name} sha256:{file_sha256(weights_file)}"
    return f"pretrained {hub_name}"


def inference_ready(model: nn.Module) -> nn.Module:
    """Eval mode, weights channels_last: every CNN of the extractor (convolutions in NHWC are
    oneDNN's and cuDNN's fast layout, ~15% on a CPU for resnet50; the outputs are the same)."""
    return model.eval().to(memory_format=torch.channels_last)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a randomly initialised network deterministically, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def create_timm_backbone(name: str, in_chans: int, *, weights_file: str | None, random_init: bool,
                         seed: int, option: str) -> tuple[nn.Module, str]:
    """A timm model returning global-pooled features (num_classes=0), and its weights identity.

    With `in_chans` != 3, timm itself adapts pretrained RGB first-conv weights (averaged
    and tiled over the channels, rescaled): TSN's cross-modality initialisation. A file whose
    first conv already has `in_chans` channels (a trained flow network) loads unchanged.
    `option` names the CLI option for this network's weights file (for error messages).
    """
    import timm

    def build(**kwargs) -> nn.Module:
        return timm.create_model(name, num_classes=0, in_chans=in_chans, **kwargs)

    if not timm.is_model(name.split(".")[0]):
        raise VidpipeError(f"backbone '{name}': not a timm model name (see timm.list_models())")
    if random_init:
        return inference_ready(seeded(seed, build)), weights_identity(True, seed, None, name)
    if weights_file:
        path = _weights_file(weights_file)
        try:
            model = build(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
            _check_no_foreign_keys(model, path)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise VidpipeError(f"{path}: weights do not fit backbone '{name}' ({first_line(exc)[:150]})") from None
        return inference_ready(model), weights_identity(False, seed, str(path), name)
    with _hub_access(name, option, "https://huggingface.co"):
        model = build(pretrained=True)
    tag = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or name
    return inference_ready(model), weights_identity(False, seed, None, tag)


def _check_no_foreign_keys(model: nn.Module, path: Path) -> None:
    """timm tolerates unexpected keys (it drops the classifier): refuse other architectures."""
    from timm.models import load_state_dict

    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    known = set(model.state_dict())
    foreign = [key for key in load_state_dict(str(path))
               if key not in known and not key.startswith(tuple(c + "." for c in classifier))]
    if foreign:
        raise RuntimeError(f"{len(foreign)} keys of another architecture, e.g. {foreign[0]}")


def read_checkpoint(path: str | os.PathLike) -> object:
    """A checkpoint file's contents without running pickled code (weights_only), also when its
    metadata holds numpy scalars (mmcv/mmengine's `meta`, e.g. a best score)."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    numpy_types = [scalar, np.dtype, *{type(np.dtype(kind)) for kind in "fdilb"}]
    try:
        with torch.serialization.safe_globals(numpy_types):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # unpickling errors come in many types
        raise VidpipeError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)[:150]})") from None


def load_weights_file(model: nn.Module, weights_file: str, name: str) -> str:
    """Load a plain state dict file into `model` (torchvision networks); returns its identity."""
    path = _weights_file(weights_file)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as exc:  # unpickling and shape errors come in many types
        raise VidpipeError(f"{path}: weights do not fit '{name}' ({first_line(exc)})") from None
    return weights_identity(False, 0, str(path), name)


@contextlib.contextmanager
def _hub_access(name: str, option: str, url: str) -> Iterator[None]:
    """Download from the hub when reachable; offline, use only what is cached, failing fast."""
    import huggingface_hub.constants as hub

    host = urlparse(os.environ.get("HF_ENDPOINT", url)).hostname or "huggingface.co"
    offline_before = hub.HF_HUB_OFFLINE
    if not _reachable(host):
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    except VidpipeError:
        raise
    except Exception as exc:  # hub, url and cache errors come in many types
        raise _weights_unavailable(f"backbone '{name}'", option, exc) from None
    finally:
        hub.HF_HUB_OFFLINE = offline_before


@contextlib.contextmanager
def torch_hub_access(name: str, option: str) -> Iterator[None]:
    """The same one-line failure for torchvision's URL downloads (cached files need no network)."""
    try:
        yield
    except Exception as exc:
        raise _weights_unavailable(f"'{name}'", option, exc) from None


def _weights_unavailable(what: str, option: str, exc: BaseException) -> VidpipeError:
    return VidpipeError(f"{what}: pretrained weights unavailable ({first_line(exc)[:120]}); "
                        f"pass a weights file with {option}, or choose --random-init")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _weights_file(weights_file: str) -> Path:
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise VidpipeError(f"{path}: weights file not found")
    return path
