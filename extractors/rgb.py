"""RGB stream: one appearance vector per chunk (TSN convention).

The chunk's centre frame, short side resized, centre crop, normalised with the mean and std
of the backbone's pretrained config (`timm.data.resolve_data_config`: ImageNet for resnet50,
0.5 for CLIP-style or Inception models), through a timm backbone with global pooling
(resnet50: 2048-d). The same config gives the default resize, crop and interpolation
(`input_config`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidpipe.extractors.backbone import create_timm_backbone

INTERPOLATIONS = ("bilinear", "bicubic")   # what torch resizes with antialiasing; others -> bilinear


def resize_short_side(frames: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, h, w) with min(h, w) = size, aspect ratio kept."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target == (height, width):
        return frames
    mode = interpolation if interpolation in INTERPOLATIONS else "bilinear"
    # antialiasing matters when shrinking only (and is slow on the CPU)
    return F.interpolate(frames, size=target, mode=mode, align_corners=False, antialias=scale < 1)


@dataclass(frozen=True)
class InputConfig:
    """How a backbone's pretrained weights expect their input (timm's data config)."""
    mean: tuple[float, ...]        # of [0, 1] pixels
    std: tuple[float, ...]
    crop: int                      # input_size
    resize: int                    # short side before the crop: floor(crop / crop_pct), as timm
    interpolation: str

    @classmethod
    def of(cls, model: nn.Module) -> "InputConfig":
        """From the model's pretrained_cfg (present without weights: random init works too)."""
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        crop = int(config["input_size"][-1])
        return cls(mean=tuple(config["mean"]), std=tuple(config["std"]), crop=crop,
                   resize=math.floor(crop / config.get("crop_pct", 1.0)),
                   interpolation=config.get("interpolation", "bilinear"))


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) -> (..., size, size) from the middle."""
    height, width = frames.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top:top + size, left:left + size]


class RGBStream(nn.Module):
    """Centre frames of resized chunks -> pooled backbone features."""

    def __init__(self, backbone: str, crop: int | None = None, *, weights_file: str | None = None,
                 random_init: bool = False, seed: int = 0):
        super().__init__()
        self.backbone, self.weights_identity = create_timm_backbone(
            backbone, in_chans=3, weights_file=weights_file, random_init=random_init,
            seed=seed, option="--rgb-weights PATH")
        self.input_config = InputConfig.of(self.backbone)
        self.register_buffer("mean", torch.tensor(self.input_config.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(self.input_config.std).view(1, 3, 1, 1) * 255)
        self.crop = crop or self.input_config.crop

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, 3, h, w) float in [0, 255], short side already resized -> (B, D)."""
        x = center_crop(frames, self.crop)            # (B, 3, crop, crop)
        x = (x - self.mean) / self.std
        return self.backbone(x)                       # (B, D) global pooled
