"""RGB stream: one appearance vector per chunk (TSN convention).

The chunk's centre frame, short side resized, centre crop, ImageNet normalisation, through
a timm backbone with global pooling (resnet50: 2048-d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from vidpipe.extractors.backbone import create_timm_backbone


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, h, w) with min(h, w) = size, aspect ratio kept."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target == (height, width):
        return frames
    # antialiasing matters when shrinking only (and is slow on the CPU)
    return F.interpolate(frames, size=target, mode="bilinear", align_corners=False, antialias=scale < 1)


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) -> (..., size, size) from the middle."""
    height, width = frames.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top:top + size, left:left + size]


class RGBStream(nn.Module):
    """Centre frames of resized chunks -> pooled backbone features."""

    def __init__(self, backbone: str, crop: int, *, weights_file: str | None = None,
                 random_init: bool = False, seed: int = 0):
        super().__init__()
        self.crop = crop
        self.backbone, self.weights_identity = create_timm_backbone(
            backbone, in_chans=3, weights_file=weights_file, random_init=random_init,
            seed=seed, option="--rgb-weights PATH")
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255)

    @property
    def dim(self) -> int:
        return self.backbone.num_features

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, 3, h, w) float in [0, 255], short side already resized -> (B, D)."""
        x = center_crop(frames, self.crop)            # (B, 3, crop, crop)
        x = (x - self.mean) / self.std
        return self.backbone(x)                       # (B, D) global pooled
